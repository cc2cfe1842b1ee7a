"""How PII masking reads a text (serving/pii.py does the masking): the byte view (one byte per character,
every Unicode decimal digit as its ASCII digit, full-width forms as ASCII), the maximal runs of digits in it,
and the card, phone and IPv4 spans read straight off those runs with numpy, without a regex."""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np

_OTHER = 0x80  # a character outside every pattern's classes


@functools.cache
def _normalization() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The byte each BMP code point reads as, and the supplementary-plane digits with their bytes."""
    every_character = "".join(map(chr, range(0x80, 0x110000)))
    mapped = {ord(digit): 0x30 + unicodedata.decimal(digit)  # str patterns' \d: every Unicode decimal digit
              for digit in re.findall(r"\d", every_character)}
    mapped.update({cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)})  # full-width ！..～ -> ASCII ! .. ~
    mapped[0x3000] = 0x20  # ideographic space
    bmp = np.full(0x10000, _OTHER, np.uint8)
    bmp[:0x80] = np.arange(0x80, dtype=np.uint8)
    for cp, byte in mapped.items():
        if cp < 0x10000:
            bmp[cp] = byte
    astral = sorted((cp, byte) for cp, byte in mapped.items() if cp >= 0x10000)
    return bmp, np.array([cp for cp, _ in astral], np.uint32), np.array([b for _, b in astral], np.uint8)


def _view(text: str) -> np.ndarray:
    """The text as the patterns read it: one byte per character (see the module docstring)."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), np.uint8)
    bmp, astral_cps, astral_bytes = _normalization()
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    view = bmp[np.minimum(cps, 0xFFFF)]
    astral = np.flatnonzero(cps > 0xFFFF)
    if astral.size:
        at = np.minimum(np.searchsorted(astral_cps, cps[astral]), len(astral_cps) - 1)
        hit = astral_cps[at] == cps[astral]
        view[astral[hit]] = astral_bytes[at[hit]]
    return view


def _in(codes: np.ndarray, chars: bytes) -> np.ndarray:
    found = codes == chars[0]
    for char in chars[1:]:
        found |= codes == char
    return found


def _in_lengths(lengths: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    found = lengths == values[0]
    for value in values[1:]:
        found |= lengths == value
    return found


def _is_digit(codes: np.ndarray) -> np.ndarray:
    return (codes - 48).astype(np.uint8) < 10


class _DigitRuns:
    """The maximal runs of ASCII digits in the view: where each starts and ends, and the bytes around it
    (0 past either end of the text), how many digits the view holds up to each run's end, the lengths as
    bytes (capped at 255: comparisons read 8 times less memory) and which runs the next follows after one
    character."""

    def __init__(self, view: np.ndarray):
        padded = np.zeros(len(view) + 4, np.uint8)
        padded[1:-3] = view
        digit = _is_digit(padded)
        edges = np.flatnonzero(digit[1:] != digit[:-1])
        self.starts, self.ends = edges[0::2], edges[1::2]
        self.lengths = self.ends - self.starts
        # padded[i + 1] is view[i]; shifted slices, not shifted indices (no index array per byte read).
        self.before, self.first, self.second, self.third = (padded[k:][self.starts] for k in range(4))
        self.after, self.after2, self.after3 = (padded[k:][self.ends] for k in range(1, 4))
        self.digits_through = np.cumsum(self.lengths)  # digits in the view up to each run's end
        self.short = np.minimum(self.lengths, 255).astype(np.uint8)  # for comparisons with lengths below 255
        # Whether the next run starts one character after this one's end: the character after the one
        # that ends a maximal run is a digit only where the next run starts.
        self.one_apart = _is_digit(self.after2[:-1])


class _DigitStarts:
    """Which digit runs a kind of the digit pass can match at (a superset, read off each kind's pattern),
    and the chains of groups joined by one space or dash that cards and mobiles are read from.
    `other`: 11 or 13 digits (a mobile), 13-19 (a card), 10, 15, 17 or 18 not after a letter (a bare
    10-digit phone, an ID card); 13+ digits in the chain from this group on, not after a dash (a card);
    1[3-9]d or 86 followed by [ -]1 or 1 (a mobile). `ip`: 1-3 digits followed by a dot and not preceded
    by one. `alone`: an `ip` where no other kind can start, nor earlier in its chain (a card or mobile
    could run into it, "1 2 ... 3 4.5.6.7")."""

    def __init__(self, runs: _DigitRuns):
        before, after = runs.before, runs.after
        lengths = runs.short
        space_or_dash_after = _in(after, b" -")
        joined = runs.one_apart & space_or_dash_after[:-1]  # to the next group
        new_chain = np.concatenate(([True], ~joined))
        self.chain_starts = np.flatnonzero(new_chain)
        self.chain = np.cumsum(new_chain) - 1
        chain_last = np.concatenate((self.chain_starts[1:] - 1, [len(lengths) - 1]))
        through = runs.digits_through
        self.chain_end_digits = through[chain_last][self.chain]  # digits up to the end of each run's chain
        digits_from_here = self.chain_end_digits - through + runs.lengths
        letter_before = ((before | 0x20) - 97).astype(np.uint8) < 26
        self.mobile = (runs.first == ord("1")) & ((runs.second - 51).astype(np.uint8) < 7) & (lengths >= 3) | (
            (runs.first == ord("8")) & (runs.second == ord("6")) & (
                ((lengths == 2) & space_or_dash_after & (runs.after2 == ord("1"))
                 & ((runs.after3 - 51).astype(np.uint8) < 7)) | ((lengths >= 4) & (runs.third == ord("1")))))
        self.other = ((lengths == 11) | (lengths == 13) | ((lengths >= 13) & (lengths <= 19))
                      | (~letter_before & _in_lengths(lengths, (10, 15, 17, 18)))
                      | ((before != ord("-")) & space_or_dash_after & (digits_from_here >= 13))
                      | (self.mobile & ((lengths >= 10) | space_or_dash_after)))
        self.ip = (lengths <= 3) & (after == ord(".")) & (before != ord("."))
        self.alone = self.ip & ~self.other
        alone = np.flatnonzero(self.alone)
        if alone.size:  # (read at those runs only, by binary search among the `other` runs)
            other = np.flatnonzero(self.other)
            last_other_before = np.append(other, -1)[np.searchsorted(other, alone) - 1]  # -1: none
            self.alone[alone[last_other_before >= self.chain_starts[self.chain[alone]]]] = False


def _ip_addresses(runs: _DigitRuns, alone: np.ndarray) -> np.ndarray:
    """The first runs of the IPv4 addresses that start at the runs `alone` (see _DigitStarts), as
    _IP_MULTI and _IP_SINGLE match them: four groups joined by single dots, each 0-255 without a
    leading zero, the last not followed by a digit or a dot and a digit. Read for every run at once
    (byte comparisons and shifted slices, no gathers), then at the candidates."""
    first = np.flatnonzero(alone)
    first = first[first + 3 < len(runs.lengths)]
    if not first.size:
        return first
    lengths, lead, second, third = runs.short, runs.first, runs.second, runs.third
    # 0-255 without a leading zero, read off the digits' bytes: 0-9, 10-99, 100-199, 200-249, 250-255.
    octet = (lengths == 1) | ((lengths == 2) & (lead != ord("0"))) | ((lengths == 3) & (
        (lead == ord("1")) | ((lead == ord("2")) & ((second < ord("5")) | ((second == ord("5")) & (third <= ord("5")))))))
    dot_to_next = runs.one_apart & (runs.after[:-1] == ord("."))
    ends_address = ~((runs.after == ord(".")) & _is_digit(runs.after2))
    address = (octet[:-3] & octet[1:-2] & octet[2:-1] & octet[3:] & dot_to_next[:-2] & dot_to_next[1:-1]
               & dot_to_next[2:] & ends_address[3:])  # from each run, four octets joined by dots
    return first[address[first]]


def _rank(candidate: np.ndarray) -> np.ndarray:
    """For each index 0..len(candidate), how many candidates lie before it (the position among the
    candidates, np.flatnonzero(candidate), of the first one at or after it)."""
    ranks = np.zeros(len(candidate) + 1, np.int64)
    np.cumsum(candidate, dtype=np.int64, out=ranks[1:])
    return ranks


def _visited(following: np.ndarray) -> np.ndarray:
    """The indices visited from 0 when each index i moves on to following[i] (> i), until past the end:
    how the regex moves on, leftmost first, from each span it takes or start it passes over. One step of
    Python each, reading the array in place through a memoryview (measured: a list of the visited indices
    is cheaper to fill than an array.array, whose append converts each int)."""
    steps = memoryview(np.ascontiguousarray(following, np.int64))
    visited: list[int] = []
    visit, end, position = visited.append, len(steps), 0
    while position < end:
        visit(position)
        position = steps[position]
    return np.array(visited, np.int64)


def _card_chains(runs: _DigitRuns, kinds: _DigitStarts, scanned: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Card-shaped spans read off the chains in which only cards can start (no mobile, ID card, 10-digit
    phone or IPv4 start, and not entered from a dot, where an address may end), leftmost first as the
    regex takes them: from a group, the most digits up to 19 (at least 13) that end a group not followed
    by a dash. Returns the mask of those chains, and each span's first and last run."""
    if not scanned.any():
        nothing = np.zeros(0, np.int64)
        return np.zeros(len(kinds.chain_starts), bool), nothing, nothing
    lengths = runs.lengths
    card_only = ~kinds.mobile & ~kinds.ip & ~_in_lengths(runs.short, (10, 15, 17, 18)) & (runs.short <= 19)
    other_start = np.zeros(len(kinds.chain_starts), bool)
    other_start[kinds.chain[np.flatnonzero(scanned & ~card_only)]] = True
    entered_from_dot = (runs.before[kinds.chain_starts] == ord(".")) & scanned[kinds.chain_starts]
    fast_chain = ~other_start & ~entered_from_dot
    is_fast = scanned & fast_chain[kinds.chain]
    fast = np.flatnonzero(is_fast)
    if not fast.size:
        return fast_chain, fast, fast
    # From each candidate group, the last run ending within 19 digits of its first digit in its chain,
    # then back to one not followed by a dash. Where most runs are candidates, read for every run at once
    # (lookups in the last run ending by each count of digits, and in the last run not followed by a dash
    # up to each run; no gathers); where few are, by binary search from the candidates alone.
    dense = 2 * fast.size > len(lengths)
    at = slice(None) if dense else fast
    through = runs.digits_through
    before = through[at] - lengths[at]  # digits before the group
    limit = np.minimum(before + 19, kinds.chain_end_digits[at])
    can_end = runs.after != ord("-")
    if dense:
        last_ending_by = np.repeat(np.arange(-1, len(lengths), dtype=np.int32), np.append(lengths, 1))
        longest = last_ending_by[limit]
        last_end = (longest if can_end.all()  # (no dash: every group can end a card)
                    else np.maximum.accumulate(np.where(can_end, np.arange(len(lengths)), -1))[longest])
    else:
        ending_runs = np.flatnonzero(can_end)
        longest = np.searchsorted(through, limit, "right") - 1
        last_end = np.append(ending_runs, -1)[np.searchsorted(ending_runs, longest, "right") - 1]  # -1: none
    first = np.arange(len(lengths)) if dense else fast
    is_card = (is_fast[at] & (last_end >= first) & (through[last_end] - before >= 13) & (runs.before[at] != ord("-")))
    # Leftmost first: from a span's last group, the next start is the first card start after it (the
    # candidates where no card starts are passed over).
    card_starts, card_last = first[is_card], last_end[is_card]
    following = _rank(is_card)[card_last + 1] if dense else np.searchsorted(card_starts, card_last, "right")
    taken = _visited(following)
    return fast_chain, card_starts[taken], card_last[taken]


def _only_cards(runs: _DigitRuns, first_run: np.ndarray, last_run: np.ndarray) -> np.ndarray:
    """For card-shaped spans: no kind masked before cards can start inside (a group of 10+ digits, or one
    that starts like a mobile, 1[3-9] or 86), at the start (a first group of exactly 10 digits: a bare
    10-digit phone) or at the end (a dot and a digit follow: an IPv4 address)."""
    may_start = ((runs.short >= 10) | ((runs.first == ord("1")) & ((runs.second - 51).astype(np.uint8) < 7))
                 | ((runs.first == ord("8")) & (runs.second == ord("6"))))
    may_start_through = np.concatenate(([0], np.cumsum(may_start)))
    inside = may_start_through[last_run + 1] - may_start_through[first_run + 1] > 0
    dot_digit_after = (runs.after[last_run] == ord(".")) & _is_digit(runs.after2[last_run])
    one_group = first_run == last_run
    return ~dot_digit_after & (one_group | ~(inside | (runs.short[first_run] == 10)))


def _phone_ends(runs: _DigitRuns) -> np.ndarray:
    """Which runs a phone number can end with: a group of 2-8 digits right behind one space, dot or dash
    that follows a digit, not followed by a letter, digit, "_" or a dot or dash and a digit."""
    after = runs.after
    letter = ((after | 0x20) - 97).astype(np.uint8) < 26
    separated = np.concatenate(([False], runs.one_apart)) & _in(runs.before, b" .-")
    return ((runs.short >= 2) & (runs.short <= 8) & separated & ~letter & (after != ord("_"))
            & ~(_in(after, b".-") & _is_digit(runs.after2)))


def _phone_chains(view: np.ndarray, runs: _DigitRuns, can_end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Phone-shaped spans read off the chains of groups joined by one space, dot or dash that no "+" or
    "(" form can enter (the first group not right after "+", "(" or ")", nor after ")" and a separator),
    leftmost first as the regex takes them: a first group of 2-4 digits not after a letter, "_" or "+",
    then the most groups, up to 3, of 2-8 digits whose last may end a phone (`can_end`). Returns each
    run's chain, the mask of those chains, and each span's first and last run."""
    lengths, before = runs.short, runs.before
    joined = runs.one_apart & _in(runs.after[:-1], b" .-")
    new_chain = np.concatenate(([True], ~joined))
    chain_starts = np.flatnonzero(new_chain)
    chain = np.cumsum(new_chain) - 1
    first_before = before[chain_starts]
    first_before2 = view[np.maximum(runs.starts[chain_starts] - 2, 0)]
    fast_chain = ~_in(first_before, b"+()") & ~(_in(first_before, b" .-") & (first_before2 == ord(")"))
                                                & (runs.starts[chain_starts] >= 2))
    letter_before = ((before | 0x20) - 97).astype(np.uint8) < 26
    starts_phone = (lengths >= 2) & (lengths <= 4) & ~letter_before & (before != ord("_")) & (before != ord("+"))
    # group[k]: run k + 1 is joined to run k and can be a following group
    group = np.concatenate((joined & (lengths[1:] >= 2) & (lengths[1:] <= 8), [False, False, False]))
    ends_at = np.concatenate((can_end, [False, False, False]))
    n = len(lengths)
    one, two, three = group[:n], group[:n] & group[1:n + 1], group[:n] & group[1:n + 1] & group[2:n + 2]
    groups = np.where(three & ends_at[3:n + 3], np.uint8(3), np.where(two & ends_at[2:n + 2], np.uint8(2),
                                                                       (one & ends_at[1:n + 1]).view(np.uint8)))
    is_fast = starts_phone & (groups > 0) & fast_chain[chain]
    fast = np.flatnonzero(is_fast)
    last = fast + groups[fast]
    taken = _visited(_rank(is_fast)[last + 1])  # leftmost first: the next start after a span's last group
    return chain, fast_chain, fast[taken], last[taken]
