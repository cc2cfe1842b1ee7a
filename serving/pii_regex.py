"""mask_pii by the regexes alone: each pass's regex scans the whole text and each span is checked on its
own. mask_pii takes this path for short ASCII texts, and the tests compare the fast path
(serving/pii.py `_mask_by_candidates`) with it; card-shaped spans with other kinds inside are masked here
for both paths (`_mask_card_shaped`)."""

from __future__ import annotations

from serving.pii_patterns import (
    PII_PLACEHOLDERS,
    _CARD_DIGITS,
    _DATE,
    _DIGIT_PASS,
    _EMAIL,
    _IBAN_PASS,
    _INSIDE_CARD,
    _INSIDE_CARD_REACH,
    _PHONE_PASS,
    _PLUS86_MOBILE,
    _luhn_valid,
)

_LABELS = ("email", "cn_id", "card", "phone", "ip", "iban")
_LABEL = {name: i for i, name in enumerate(_LABELS)}
_PLACEHOLDER_LIST = [PII_PLACEHOLDERS[name] for name in _LABELS]
_KIND_LABEL = {"cn_id": _LABEL["cn_id"], "mobile": _LABEL["phone"], "mobile_": _LABEL["phone"],
               "phone10": _LABEL["phone"], "ip": _LABEL["ip"], "ip_": _LABEL["ip"]}


def _mask_card_shaped(data: bytes, start: int, end: int, starts: list, ends: list, labels: list) -> int:
    """Masks a card-shaped span data[start:end] that other kinds may start in (appending to the span
    lists) and returns where it stops (past `end` when a kind inside it runs on). Those kinds are looked
    for in the whole text, so lookarounds see the real neighbours."""
    inner = [found for found in _INSIDE_CARD.finditer(data, start, min(end + _INSIDE_CARD_REACH, len(data)))
             if not found.lastgroup.startswith("rest") and found.start() < end]
    if all(found.lastgroup == "phone10" for found in inner):  # nothing masked before cards
        if _luhn_valid(data[start:end], b" -"):
            starts.append(start), ends.append(end), labels.append(_LABEL["card"])
            return end
    elif _is_card(before := data[start:inner[0].start()].rstrip(b" -")):  # a card, then an ID card ...
        starts.append(start), ends.append(start + len(before)), labels.append(_LABEL["card"])
    kept = end
    for found in inner:
        starts.append(found.start()), ends.append(found.end()), labels.append(_KIND_LABEL[found.lastgroup])
        kept = found.end()
    return max(kept, end)


def _is_card(text: bytes) -> bool:
    return bool(_CARD_DIGITS.fullmatch(text)) and _luhn_valid(text, b" -")


def _mask_by_regex_alone(text: str) -> str:
    """mask_pii of an ASCII text with each pass's regex scanning the whole text and the checks done one
    span at a time: what the windows and the vectorized reading compute, directly (short texts, and the
    reference the tests compare mask_pii with)."""
    data = bytearray(text.encode("ascii"))
    spans: list[tuple[int, int, int]] = []

    def mask(found: list[tuple[int, int, int]]) -> None:
        for start, end, label in found:
            data[start:end] = b"[" + b"#" * (end - start - 2) + b"]"
        spans.extend(found)

    mask([(*m.span(), _LABEL["email"]) for m in _EMAIL.finditer(data)])
    mask([(*m.span(), _LABEL["iban"]) for m in _IBAN_PASS.finditer(data)
          if m.lastgroup == "iban" and _iban_valid(bytes(m.group()))])
    mask([(*m.span(), _LABEL["phone"]) for m in _PLUS86_MOBILE.finditer(data)])
    found_starts, found_ends, found_labels, position = [], [], [], 0
    while position < len(data):
        for match in _DIGIT_PASS.finditer(data, position):
            kind, (start, end) = match.lastgroup, match.span()
            if kind.startswith("rest"):
                continue
            if kind in _KIND_LABEL:
                found_starts.append(start), found_ends.append(end), found_labels.append(_KIND_LABEL[kind])
                continue
            stop = _mask_card_shaped(bytes(data), start, end, found_starts, found_ends, found_labels)
            if stop > end:  # a kind inside the span runs on past it: scan again from there
                position = stop
                break
        else:
            break
    mask(list(zip(found_starts, found_ends, found_labels)))
    phones = []
    for match in _PHONE_PASS.finditer(data):
        if match.lastgroup == "phone":
            digits = len(match.group().translate(None, b" .-()+"))
            if 7 <= digits <= 15 and not (digits <= 8 and _DATE.fullmatch(match.group())):
                phones.append((*match.span(), _LABEL["phone"]))
    mask(phones)
    pieces, kept = [], 0
    for start, end, label in sorted(spans):
        pieces += (text[kept:start], _PLACEHOLDER_LIST[label])
        kept = end
    return "".join(pieces) + text[kept:]


def _iban_valid(text: bytes) -> bool:
    compact = text.replace(b" ", b"").decode("ascii")
    return 15 <= len(compact) <= 34 and int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1
