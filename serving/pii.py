"""PII masking for serving's prompts, outputs and logs: emails, IBANs, Chinese ID-card and mobile numbers,
IPv4 addresses, bank cards and phone numbers are replaced by placeholders like [EMAIL].

How it stays fast on any input (issue 11 item 4; `python -m benchmarks.pii_masking` times 1 MB of 29
adversarial shapes against 100 ms):
- The patterns read a byte view of the text, one byte per character (`_view`): ASCII as is, every Unicode
  decimal digit (full-width ０-９, Arabic-Indic, Devanagari, ...) as its ASCII digit, full-width forms and
  the ideographic space as their ASCII counterparts, anything else as 0x80, which no pattern's class holds.
  Indices are the text's, so spans found in the view are cut from the original text.
- Passes in a fixed order (emails, IBANs, +86 mobiles, the digit kinds, phone numbers); a span masked by
  one pass reads as "[###]" to the later ones, as its placeholder would.
- numpy finds, for the IBAN, digit and phone passes, the positions where their kinds can start or end
  (from the digit runs: lengths, the characters around them, the digits a card-shaped chain of groups
  holds), and the regex runs only in windows around those positions: text where nothing can match costs
  a few vectorized operations per character, not an attempt of each pattern at each digit.
- IPv4 addresses that no other kind can reach, Luhn checks of card-shaped spans in which nothing else can
  start (uint8 prefix sums over the view's digits alone), mod-97 checks of IBANs (Horner's rule over all
  spans, one column of characters at a time) and digit counts of phone-shaped spans run vectorized, all
  at once; where most runs are candidates, the spans are read for every run at once (no gathers). Where
  spans are dense, no step makes a Python object per span but the leftmost-first walks (one step of
  Python per span taken); emails come from one `split` of the whole text.
- Patterns and checks: serving/pii_patterns.py (every repeat bounded, so each attempt is too); the byte
  view, the digit runs and the spans read off them: serving/pii_runs.py; the regexes alone (short texts,
  and the reference the tests compare with): serving/pii_regex.py.
"""

from __future__ import annotations

import itertools
import operator
import re

import numpy as np

from serving.pii_patterns import (  # noqa: F401 (PII_PLACEHOLDERS, PII_PATTERNS: re-exported)
    PII_PLACEHOLDERS,
    PII_PATTERNS,
    _DIGIT_PASS,
    _DIGIT_REACH,
    _EMAIL_SPLIT,
    _IBAN_PASS,
    _IBAN_REACH,
    _PHONE_PASS,
    _PHONE_REACH,
    _PLUS86_MOBILE,
    _iban_valid_spans,
    _NOT_DIGITS,
    _luhn_valid_digit_spans,
)
from serving.pii_regex import (  # noqa: F401 (_mask_by_regex_alone: the tests' reference)
    _KIND_LABEL,
    _LABEL,
    _PLACEHOLDER_LIST,
    _mask_by_regex_alone,
    _mask_card_shaped,
)
from serving.pii_runs import (
    _card_chains,
    _DigitRuns,
    _DigitStarts,
    _in,
    _ip_addresses,
    _is_digit,
    _only_cards,
    _phone_chains,
    _phone_ends,
    _view,
)

# A window's scan reads this far past its last possible start: more than any match (the "rest of a run"
# consumers aside, which mask nothing) and its lookahead, so it sees what a scan of the whole text sees.
_MARGIN = 72
_MERGE_GAP = 64  # windows closer than this are scanned as one


# ---- the masking --------------------------------------------------------------------------------------
_NO_KIND, _CARD_SHAPED = -1, -2


def _group_labels(pattern: re.Pattern[bytes]) -> np.ndarray:
    """Label of each group index of the digit pass: a placeholder, _CARD_SHAPED, or _NO_KIND."""
    labels = np.full(pattern.groups + 1, _NO_KIND, np.int64)
    for name, index in pattern.groupindex.items():
        labels[index] = _KIND_LABEL.get(name, _CARD_SHAPED if name.startswith("card") else _NO_KIND)
    return labels


_DIGIT_PASS_LABELS = _group_labels(_DIGIT_PASS)
_NOT_UPPERCASE = bytes(byte for byte in range(256) if not 65 <= byte <= 90)  # bytes.translate's delete
_LASTINDEX = operator.attrgetter("lastindex")


class _Masking:
    """The view the patterns read, and the spans masked so far (each reads as "[###]" to later passes)."""

    def __init__(self, text: str):
        self.text = text
        self.view = _view(text)
        self.data = self.view.tobytes()
        self._digits: bytes | None = None
        self.starts: list[np.ndarray] = []
        self.ends: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def mask(self, starts, ends, labels, last_pass: bool = False) -> None:
        starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        if not starts.size:
            return
        self.starts.append(starts)
        self.ends.append(ends)
        self.labels.append(np.broadcast_to(np.asarray(labels, np.int64), starts.shape))
        if last_pass:
            return  # no pass reads the view again
        view = self.view.copy()
        if starts.size < 256:
            for start, end in zip(starts.tolist(), ends.tolist()):
                view[start:end] = ord("#")
        else:
            np.putmask(view, _covered(starts, ends, len(view)), ord("#"))  # (cheaper than a masked store)
        view[starts] = ord("[")
        view[ends - 1] = ord("]")
        self.view, self.data, self._digits = view, view.tobytes(), None

    def luhn_valid(self, runs: _DigitRuns, first_runs: np.ndarray, last_runs: np.ndarray) -> np.ndarray:
        """Luhn checks of the card-shaped spans from the first digit of each first run to the last digit
        of its last run, read off the view's digits alone (the runs' digit counts place the spans)."""
        if self._digits is None:
            self._digits = self.data.translate(None, _NOT_DIGITS)
        through = runs.digits_through
        return _luhn_valid_digit_spans(self._digits, through[first_runs] - runs.lengths[first_runs],
                                       through[last_runs])

    def result(self) -> str:
        """The original text with every masked span replaced by its placeholder."""
        if not self.starts:
            return self.text
        starts, ends, labels = (np.concatenate(parts) for parts in (self.starts, self.ends, self.labels))
        if len(starts) > 256 and self.text.isascii():
            codes = np.frombuffer(self.text.encode("ascii"), np.uint8)
            if codes.min() > len(_PLACEHOLDER_LIST):  # no character that reads as a label below
                # Masked characters dropped, each span's first one replaced by its label's byte.
                marked = codes * ~_covered(starts, ends, len(codes))  # (a product: cheaper than a masked store)
                marked[starts] = labels + 1
                masked = marked.tobytes().translate(None, b"\x00")
                for label, placeholder in enumerate(_PLACEHOLDER_LIST):
                    masked = masked.replace(bytes([label + 1]), placeholder.encode("ascii"))
                return masked.decode("ascii")
        order = np.argsort(starts, kind="stable")
        starts, ends, labels = starts[order], ends[order], labels[order]
        kept = list(map(slice, [0, *ends.tolist()], [*starts.tolist(), len(self.text)]))
        pieces = [""] * (2 * len(kept) - 1)
        pieces[0::2] = operator.itemgetter(*kept)(self.text)
        pieces[1::2] = map(_PLACEHOLDER_LIST.__getitem__, labels.tolist())
        return "".join(pieces)


def _covered(starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """Which of `length` positions the spans cover: spans do not overlap, so a position is covered when
    more spans start than end up to it."""
    steps = np.zeros(length + 1, np.int8)
    steps[starts] = 1
    steps[ends] -= 1  # an end may be another span's start
    return np.cumsum(steps[:-1], dtype=np.int8).astype(bool)


def _windows(starts: np.ndarray, reach: int, length: int) -> list[tuple[int, int]]:
    """Merged windows [start, start + reach) around sorted possible match starts."""
    if not starts.size:
        return []
    ends = np.minimum(starts + reach, length)
    breaks = np.flatnonzero(starts[1:] > ends[:-1] + _MERGE_GAP) + 1
    return list(zip(starts[np.concatenate(([0], breaks))].tolist(),
                    ends[np.concatenate((breaks - 1, [len(ends) - 1]))].tolist()))


def _scan(pattern: re.Pattern[bytes], data: bytes, windows: list[tuple[int, int]], grouped: bool = True):
    """Starts, ends, group indices (lastindex; 0 when not `grouped`) and window indices of the matches that
    start inside the windows, as a scan of the whole text finds them: nothing with a kind starts outside
    the windows, and each window's scan reads _MARGIN past its end, more than any match with a kind and
    its lookahead read."""
    found, window_ends, counts = [], [], []
    for start, end in windows:
        matches = list(pattern.finditer(data, start, min(end + _MARGIN, len(data))))
        found += matches
        window_ends.append(end)
        counts.append(len(matches))
    spans = np.fromiter(itertools.chain.from_iterable(map(re.Match.span, found)), np.int64, 2 * len(found))
    starts, ends = spans[0::2], spans[1::2]
    groups = (np.fromiter(map(_LASTINDEX, found), np.int64, len(found)) if grouped
              else np.zeros(len(found), np.int64))
    window = np.repeat(np.arange(len(windows)), counts)
    inside = starts < np.repeat(np.array(window_ends, np.int64), counts)
    return starts[inside], ends[inside], groups[inside], window[inside]


def _mask_emails(masking: _Masking) -> None:
    if b"@" in masking.data and b"." in masking.data:  # every domain holds a dot
        # Dense emails cost a Match object each with finditer; split makes only the pieces, in C.
        pieces = _EMAIL_SPLIT.split(masking.data)  # between emails, an email, between, ..., between
        bounds = np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)))
        masking.mask(bounds[0:-1:2], bounds[1::2], _LABEL["email"])


def _mask_ibans(masking: _Masking) -> None:
    """IBANs start at an uppercase letter that starts a word, followed by a letter and two digits."""
    if len(masking.data.translate(None, _NOT_UPPERCASE)) < 2:
        return  # (one C pass: cheaper than finding the starts where digits alone are dense)
    padded = np.zeros(len(masking.view) + 4, np.uint8)
    padded[1:-3] = masking.view
    upper = (padded - 65).astype(np.uint8) < 26
    digit = _is_digit(padded)
    alnum = upper | digit | ((padded - 97).astype(np.uint8) < 26)
    can_start = upper[1:-3] & upper[2:-2] & digit[3:-1] & digit[4:] & ~alnum[:-4]
    windows = _windows(np.flatnonzero(can_start), _IBAN_REACH, len(masking.view))
    starts, ends, groups, _ = _scan(_IBAN_PASS, masking.data, windows)
    iban = groups == _IBAN_PASS.groupindex["iban"]
    starts, ends = starts[iban], ends[iban]
    valid = _iban_valid_spans(masking.view, starts, ends)
    masking.mask(starts[valid], ends[valid], _LABEL["iban"])


def _mask_plus86_mobiles(masking: _Masking) -> None:
    """+86 mobiles: "+86", an optional space or dash, 1[3-9]."""
    if b"+86" not in masking.data:
        return
    padded = np.zeros(len(masking.view) + 6, np.uint8)
    padded[:-6] = masking.view
    mobile_digit = (padded - 51).astype(np.uint8) < 7
    can_start = (padded[:-6] == ord("+")) & (padded[1:-5] == ord("8")) & (padded[2:-4] == ord("6")) & (
        ((padded[3:-3] == ord("1")) & mobile_digit[4:-2])
        | (_in(padded[3:-3], b" -") & (padded[4:-2] == ord("1")) & mobile_digit[5:-1]))
    windows = _windows(np.flatnonzero(can_start), 20, len(masking.view))
    starts, ends, _, _ = _scan(_PLUS86_MOBILE, masking.data, windows, grouped=False)
    masking.mask(starts, ends, _LABEL["phone"])


def _mask_digit_kinds(masking: _Masking, runs: _DigitRuns) -> bool:
    """The digit pass: ID cards, mobiles, IPv4 addresses, cards and bare 10-digit phones, leftmost first,
    in that order at one position. IPv4 addresses nothing else can reach and cards in chains where only
    cards start are read off the digit runs, all at once, and so are the Luhn sums of card-shaped spans
    in which nothing else can start; the regex scans the other starts, and where a card-shaped span
    holds another kind or ends inside one, the scan resumes after that kind."""
    if not runs.lengths.size:
        return False
    lengths, after = runs.short, runs.after
    if not (((lengths >= 10) & (lengths <= 19)) | _in(after, b" -") | (
            (lengths <= 3) & (after == ord(".")) & (runs.before != ord(".")))).any():
        return False  # no kind can start (from _DigitStarts, before its chains are read)
    kinds = _DigitStarts(runs)
    scanned = kinds.other | (kinds.ip & ~kinds.alone)
    ip_runs = _ip_addresses(runs, kinds.alone)
    scanned[ip_runs + 3] = False  # a last octet followed by a space could start a card; the address holds it
    fast_chain, first_runs, last_runs = _card_chains(runs, kinds, scanned)
    card_starts, card_ends = runs.starts[first_runs], runs.ends[last_runs]
    only_cards = _only_cards(runs, first_runs, last_runs)
    if not only_cards.all():  # such a chain is scanned by the regex instead
        fast_chain[kinds.chain[first_runs[~only_cards]]] = False
        read_off = fast_chain[kinds.chain[first_runs]]
        card_starts, card_ends = card_starts[read_off], card_ends[read_off]
        first_runs, last_runs = first_runs[read_off], last_runs[read_off]
    valid = masking.luhn_valid(runs, first_runs, last_runs)
    card_starts, card_ends = card_starts[valid], card_ends[valid]
    windows = _windows(runs.starts[scanned & ~fast_chain[kinds.chain]], _DIGIT_REACH, len(masking.data))
    starts, ends, labels = [], [], []
    _digit_pass_windows(masking, runs, windows, starts, ends, labels)
    starts, ends, labels = np.concatenate(starts), np.concatenate(ends), np.concatenate(labels)
    ip_starts, ip_ends = runs.starts[ip_runs], runs.ends[ip_runs + 3]
    # A window around another start may reach an address or a chain read off above: those are kept once.
    start_run = np.minimum(np.searchsorted(runs.starts, starts), len(runs.starts) - 1)
    ip_run = np.zeros(len(runs.starts), bool)
    ip_run[ip_runs] = True
    found_twice = (ip_run[start_run] & (runs.starts[start_run] == starts)) | fast_chain[kinds.chain[start_run]]
    starts = np.concatenate((starts[~found_twice], ip_starts, card_starts))
    masking.mask(starts, np.concatenate((ends[~found_twice], ip_ends, card_ends)),
                 np.concatenate((labels[~found_twice], np.full(len(ip_starts), _LABEL["ip"]),
                                 np.full(len(card_starts), _LABEL["card"]))))
    return bool(starts.size)  # whether the view changed


def _digit_pass_windows(masking: _Masking, runs: _DigitRuns, windows, starts: list, ends: list, labels: list):
    data = masking.data
    start, end, group, window = _scan(_DIGIT_PASS, data, windows)
    label = _DIGIT_PASS_LABELS[group]
    card = label == _CARD_SHAPED
    only_a_card = card.copy()
    kept = label >= 0
    if card.any():  # (_only_cards reads every run) a card-shaped span starts and ends a run
        first_runs, last_runs = np.searchsorted(runs.starts, start[card]), np.searchsorted(runs.ends, end[card])
        only = _only_cards(runs, first_runs, last_runs)
        only_a_card[card] = only
        kept[only_a_card] = masking.luhn_valid(runs, first_runs[only], last_runs[only])
    label[only_a_card] = _LABEL["card"]
    dropped = np.zeros(len(start), bool)  # found by a scan that a kind running on past a span overtook
    extra_starts, extra_ends, extra_labels = [], [], []
    for i in np.flatnonzero(card & ~only_a_card).tolist():
        if dropped[i]:
            continue
        stop = _mask_card_shaped(data, int(start[i]), int(end[i]), extra_starts, extra_ends, extra_labels)
        if stop > end[i]:  # the rest of its window is scanned again from there
            dropped |= (window == window[i]) & (np.arange(len(start)) > i)
            window_end = windows[window[i]][1]
            if stop < window_end:
                _digit_pass_windows(masking, runs, [(stop, window_end)], starts, ends, labels)
    kept &= ~dropped
    starts += [start[kept], np.array(extra_starts, np.int64)]
    ends += [end[kept], np.array(extra_ends, np.int64)]
    labels += [label[kept], np.array(extra_labels, np.int64)]


def _mask_phones(masking: _Masking, runs: _DigitRuns) -> None:
    """Phone numbers: 7-15 digits, and not a date (2024-05-01)."""
    if not runs.lengths.size:
        return
    can_end = _phone_ends(runs)
    if not can_end.any():
        return  # every phone number ends with a group of 2-8 digits after a separator
    chain, fast_chain, first_runs, last_runs = _phone_chains(masking.view, runs, can_end)
    scanned_ends = runs.ends[can_end & ~fast_chain[chain]]
    windows = _windows(np.maximum(scanned_ends - _PHONE_REACH, 0), _PHONE_REACH + 1, len(masking.data))
    starts, ends, groups, _ = _scan(_PHONE_PASS, masking.data, windows)
    start_run = np.minimum(np.searchsorted(runs.starts, starts), len(runs.starts) - 1)
    phone = (groups == _PHONE_PASS.groupindex["phone"]) & ~fast_chain[chain[start_run]]
    starts, ends = starts[phone], ends[phone]
    # A phone starts at its first group (or the "+" or "(" before it) and ends with its last group.
    first_runs = np.concatenate((np.searchsorted(runs.starts, starts), first_runs))
    last_runs = np.concatenate((np.searchsorted(runs.ends, ends), last_runs))
    starts = np.concatenate((starts, runs.starts[first_runs[len(starts):]]))
    ends = runs.ends[last_runs]
    through = runs.digits_through
    digits = through[last_runs] - through[first_runs] + runs.lengths[first_runs]
    phone = (digits >= 7) & (digits <= 15) & ~_dates(runs, starts, first_runs, last_runs)
    masking.mask(starts[phone], ends[phone], _LABEL["phone"], last_pass=True)


def _dates(runs: _DigitRuns, starts: np.ndarray, first_runs: np.ndarray, last_runs: np.ndarray) -> np.ndarray:
    """Which phone-shaped spans _DATE matches in full (2024-05-01, 2024.5.1), read off their runs: three
    groups of 4, 1-2 and 1-2 digits from the span's start, joined by one "-", "." or "/", the same twice.
    The rest is read only for the spans of three groups with a first of 4 digits."""
    dates = np.zeros(len(starts), bool)
    maybe = np.flatnonzero((last_runs - first_runs == 2) & (runs.short[first_runs] == 4))
    first = first_runs[maybe]
    second, third = first + 1, first + 2
    separator = runs.after[first]
    dates[maybe] = ((runs.starts[first] == starts[maybe]) & (runs.short[second] <= 2) & (runs.short[third] <= 2)
                    & _in(separator, b"-./") & (runs.after[second] == separator)
                    & (runs.starts[second] == runs.ends[first] + 1) & (runs.starts[third] == runs.ends[second] + 1))
    return dates


_SHORT = 8192  # characters: below this, numpy's fixed cost exceeds what finding candidates saves


def mask_pii(text: str) -> str:
    """Replace emails, IBANs, Chinese ID-card numbers (18 and legacy 15 digits), Chinese mobiles, IPv4
    addresses, Luhn-valid bank cards, bare 10-digit and other phone numbers with placeholders like
    [EMAIL], in ASCII and in other digit forms (full-width ０-９ and every Unicode decimal digit). Linear
    in the text length with a small constant on any input (benchmarks/pii_masking.py). Order matters:
    an IBAN holds digit groups, an ID card would also look like a phone or a card, an IPv4 address looks
    like a dotted phone number."""
    if len(text) < _SHORT and text.isascii():
        return _mask_by_regex_alone(text)
    return _mask_by_candidates(text)


def _mask_by_candidates(text: str) -> str:
    """mask_pii with numpy finding where each pass can match (see the module docstring)."""
    masking = _Masking(text)
    _mask_emails(masking)
    if not _is_digit(masking.view).any():
        return masking.result()  # every other kind holds digits
    _mask_ibans(masking)
    _mask_plus86_mobiles(masking)
    runs = _DigitRuns(masking.view)
    if _mask_digit_kinds(masking, runs):
        runs = _DigitRuns(masking.view)
    _mask_phones(masking, runs)
    return masking.result()
