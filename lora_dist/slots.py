"""Slot errors of an E2E output against its meaning representation (MR).

For every attribute of the MR: is its value realised in the output (``missing`` when not), is
another value of that attribute stated instead or as well (``wrong``: "family-friendly" for
``familyFriendly[no]``, "cheap" for ``priceRange[high]``), and is any attribute stated that the MR
does not have (``added``: a rating, a price, an area, an eat type, a food or family-friendliness
the MR leaves out). The slot error rate is

    SER = (missing + wrong + added) / slots

over every attribute of every MR: the measure of the E2E challenge's slot-error scripts (Dušek et
al.), computed here by this module's own heuristic. Values are recognised by the surface forms
the E2E references use for them (regular expressions below, on lower-cased, accent-folded text
with hyphens between words read as spaces); the MR's own ``name`` and ``near`` strings are
removed before the other attributes are looked for, so that "Café Sicilia" is not a coffee shop
and "Burger King" not fast food. ``name`` and ``near`` are realised when their string appears (a
leading "The" optional); they cannot be wrong or added. A phrasing the patterns do not know
counts as missing; an entity the MR does not name (a hallucinated "near Café Rouge") can count
as an added eat type. What it reports on the devset's own references, mostly their real
omissions, is in docs/results.md.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

# attribute -> class -> patterns. Values of the MR map to a class through CLASS_OF; an attribute
# is "stated" with every class one of whose patterns matches. Classes are looked for in the order
# given, and where an attribute is in CONSUME each class's matches are blanked before the next is
# looked for: "not family friendly" holds "family friendly", "1 out of 5 stars" holds "5 stars",
# "not highly rated" holds "highly rated", "not expensive" holds "expensive".
_RATED = r"(?:customer |consumer |user |food |guest )?(?:ratings?|rated|reviews?|reviewed|scores?|stars?)"
_KIDS = r"(?:family|families|kids?|child|children)(?:'s)? ?(?:friendly|oriented)"
_WHO = r"(?:families|family|kids|children|child)"
_PRICE = r"(?:prices?|price range|pricing|costs?|menu)"
_NOT_RATING = r"(?!\s+(?:customer |consumer |user |food )?(?:ratings?|rated|reviews?|scores?|stars?))"
PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "familyFriendly": {
        "no": (r"\b(?:not|isn't|isnt|aren't|never)(?: \w+){0,2}? " + _KIDS + r"(?:,? (?:or|nor) " + _KIDS + ")?",
               r"\bnon ?" + _KIDS, r"\bno " + _KIDS, r"\b(?:family|kids?|child|children) ?unfriendly",
               r"\b(?:isn't|not|aren't) (?:\w+ ){0,3}?(?:for|to) " + _WHO,
               r"\bno good for " + _WHO,
               r"\b(?:doesn't|does not|don't|do not|won't|will not) (?:\w+ )?(?:welcome|allow|cater (?:for|to)|accept|"
               r"accommodate|admit|serve) (?:\w+ )?" + _WHO,
               r"\b" + _WHO + r" (?:are|is) not (?:welcome|allowed)", r"\bno (?:kids|children|families)\b",
               r"\badults? only", r"\bonly for adults", r"\bfor adults", r"\badult (?:audience|crowd|clientele)"),
        "yes": (r"\b" + _KIDS,
                r"\b(?:welcomes?|welcoming|allows?|caters? (?:for|to)|accepts?|accommodates?|suitable for|good for|"
                r"great for|ideal for|perfect for|fun for|open to|friendly to) (?:\w+ )?" + _WHO,
                r"\b" + _WHO + r" (?:are|is) (?:welcome|allowed)",
                r"\bfor (?:the (?:whole |entire )?)?famil(?:y|ies)\b",
                r"\bfamily (?:place|venue|restaurant|spot)"),
    },
    "priceRange": {
        "low": (r"\b(?:isn't|not) (?:too |very |that |so |overly )?(?:expensive|pricey|costly)", r"\bcheap",
                r"\binexpensive", r"\blow(?:er)?[ -]?(?:cost|price|priced|prices|pricing|budget)", r"\baffordabl",
                r"\b(?:less than|under|below) (?:£|l)?20", r"\bbudget", r"\bbargain",
                r"\b" + _PRICE + r" (?:is |are )?(?:very |quite |fairly |rather )?(?:low|cheap)\b",
                r"\bpriced (?:in the )?low"),
        "mid": (r"\bmoderate(?:ly)?\b" + _NOT_RATING, r"\bmid(?:dle)?[ -]?(?:range|price|priced|prices|cost|level)",
                r"\bmedium[ -]?(?:price|priced|prices|cost)", r"\baverage[ -]?(?:price|priced|prices|cost|pricing)",
                r"£?20 ?(?:-|to|and) ?£?25", r"\breasonabl", r"\bfair(?:ly)? price",
                r"\b" + _PRICE + r" (?:is |are )?(?:moderate|average|medium|mid)"),
        "high": (r"(?<!in)expensive", r"\bhigh(?:er)?[ -]?(?:cost|price|priced|prices|pricing|end)", r"\bpricey",
                 r"\bpricy", r"\bcostly", r"\b(?:more than|over|above) (?:£|l)?30", r"\bupscale", r"\bluxur",
                 r"\bpremium", r"\bhighly priced", r"\bpriced (?:in the )?high",
                 r"\b" + _PRICE + r" (?:is |are )?(?:very |quite |fairly |rather )?high\b",
                 r"£30 ?(?:\+|or more|and (?:up|over|above))"),
    },
    "customer rating": {
        "low": (r"\bnot (?:well|highly|very well) (?:rated|regarded|reviewed)",
                r"\b(?:1|one) (?:out of|out|of) (?:5|five)(?: stars?)?", r"\b(?:1|one)[ -]?starr?(?:ed|s)?\b",
                r"\blow(?:ly)?[ -]?" + _RATED, r"\b(?:poor(?:ly)?|bad(?:ly)?|terrible|negative|low) " + _RATED,
                r"\b(?:ratings?|rated|rates?|reviews?|reviewed|scores?) (?:it |them |is |are |of |as |very |quite "
                r"|rather |pretty ){0,3}(?:low|poor|poorly|bad|badly|terrible|negative)\b"),
        "average": (r"\b(?:3|three) (?:out of|out|of) (?:5|five)(?: stars?)?", r"\b(?:3|three)[ -]?starr?(?:ed|s)?\b",
                    r"\baverage[ -]?" + _RATED, r"\b(?:mediocre|middling|moderate|okay|ok|decent|fair) " + _RATED,
                    r"\b(?:ratings?|rated|rates?|reviews?|reviewed|scores?) (?:it |them |is |are |of |as |an |a ){0,3}"
                    r"(?:average|mediocre|okay|moderate|decent)\b", r"\baverage(?:ly)? rated"),
        "high": (r"\b(?:5|five) (?:out of|out|of) (?:5|five)(?: stars?)?", r"\b(?:5|five)[ -]?starr?(?:ed|s)?\b",
                 r"\bhigh(?:ly)?[ -]?" + _RATED,
                 r"\b(?:excellent|great|outstanding|top|superb|stellar|glowing|high) " + _RATED,
                 r"\b(?:ratings?|rated|rates?|reviews?|reviewed|scores?) (?:it |them |is |are |of |as |very |quite "
                 r"|rather |pretty ){0,3}(?:high|highly|excellent|great|outstanding|top)\b",
                 r"\b(?:highly|well) (?:rated|regarded|reviewed)"),
    },
    "area": {
        # "outside the city centre" states neither area: blanked first, matched by no class
        "none": (r"\b(?:outside|not in|away from|out of) (?:of )?(?:the )?(?:city|town) cent(?:re|er)",),
        "city centre": (r"\bcity cent(?:re|er)", r"\bcent(?:re|er) of (?:the )?(?:city|town)", r"\bdowntown",
                        r"\bcentral", r"\btown cent(?:re|er)", r"\bcity's cent(?:re|er)", r"\bin the cent(?:re|er)\b"),
        "riverside": (r"\briver", r"\bwaterfront", r"\bwater's edge", r"\bby the water"),
    },
    "eatType": {
        "coffee shop": (r"\bcoffee ?(?:shop|house)s?", r"\bcafes?\b", r"\bcoffee place"),
        "pub": (r"\bpubs?\b", r"\binn\b", r"\btavern", r"\bbar\b"),
        "restaurant": (r"\brestaurants?\b", r"\beatery", r"\bdiner\b", r"\bbistro"),
    },
    "food": {
        "chinese": (r"\bchinese",),
        "english": (r"\benglish", r"\bbritish(?! pounds?)"),
        "fast food": (r"\bfast ?food", r"\bburgers?\b", r"\bfries\b"),
        "french": (r"\bfrench",),
        "indian": (r"\bindian", r"\bcurr(?:y|ies)"),
        "italian": (r"\bitalian", r"\bpizza", r"\bpasta"),
        "japanese": (r"\bjapanese", r"\bsushi"),
    },
}
# attributes whose classes blank their matches, in order, before the next class is looked for
CONSUME = {"familyFriendly", "priceRange", "customer rating", "area"}
# classes that blank what they match and are never a statement
NEUTRAL = {"area": {"none"}}
# an MR value -> its class in PATTERNS (values not listed are their own class, lower-cased)
CLASS_OF = {
    "priceRange": {"cheap": "low", "less than £20": "low", "moderate": "mid", "£20-25": "mid", "high": "high",
                   "more than £30": "high"},
    "customer rating": {"low": "low", "1 out of 5": "low", "average": "average", "3 out of 5": "average",
                        "high": "high", "5 out of 5": "high"},
}
# an eat type that any place is: "restaurant" realises no other type and adds none
GENERIC = {"eatType": {"restaurant"}}
STRINGS = ("name", "near")  # realised by their own string; never wrong or added
_COMPILED = {attr: {cls: re.compile("|".join(f"(?:{p})" for p in pats)) for cls, pats in classes.items()}
             for attr, classes in PATTERNS.items()}
_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*,?")


def parse_mr(mr: str) -> dict[str, str]:
    """``name[Aromi], food[English]`` -> ``{"name": "Aromi", "food": "English"}``.

    Raises:
        ValueError: ``mr`` is not a comma-separated list of ``attribute[value]``.
    """
    out: dict[str, str] = {}
    pos = 0
    text = mr.strip()
    while pos < len(text):
        m = _MR_ITEM.match(text, pos)
        if m is None:
            raise ValueError(f"not an E2E meaning representation (attribute[value], ...): {mr[:200]!r}")
        out[m.group(1).strip()] = m.group(2).strip()
        pos = m.end()
    if not out:
        raise ValueError(f"empty meaning representation: {mr!r}")
    return out


def _normalise(text: str) -> str:
    """Lower case, accents folded (café -> cafe, as outputs often spell it), hyphens between words
    read as spaces (family-friendly), dashes as hyphens (£20–£25), whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.replace("’", "'").replace("–", "-").replace("—", "-")
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)
    return re.sub(r"\s+", " ", text)


def _without(text: str, phrase: str) -> tuple[str, bool]:
    """``text`` with every occurrence of ``phrase`` (or of it without a leading "the ") blanked,
    and whether there was one."""
    variants = {_normalise(phrase)}
    if phrase.lower().startswith("the "):
        variants.add(_normalise(phrase[4:]))
    found = False
    for v in sorted(variants, key=len, reverse=True):
        rx = re.compile(r"(?<!\w)" + re.escape(v) + r"(?!\w)")
        if v and rx.search(text):
            found = True
            text = rx.sub(" | ", text)
    return text, found


def _classes(attr: str, value: str) -> str:
    return CLASS_OF.get(attr, {}).get(value, value.lower())


@dataclass(frozen=True)
class SlotErrors:
    """One output's slot errors; each tuple names the attributes (``customer rating``, ...)."""

    slots: int
    missing: tuple[str, ...] = ()
    wrong: tuple[str, ...] = ()
    added: tuple[str, ...] = ()

    @property
    def errors(self) -> int:
        return len(self.missing) + len(self.wrong) + len(self.added)

    def to_dict(self) -> dict[str, object]:
        return {"slots": self.slots, "missing": list(self.missing), "wrong": list(self.wrong),
                "added": list(self.added), "ser": 100 * self.errors / self.slots if self.slots else 0.0}


def stated(text: str, mr: dict[str, str]) -> dict[str, set[str]]:
    """Every attribute class ``text`` states (the MR's name and near strings removed first)."""
    return _read(text, mr)[0]


def _read(text: str, mr: dict[str, str]) -> tuple[dict[str, set[str]], set[str]]:
    """(every attribute class ``text`` states, which of the MR's name and near it realises)."""
    t = _normalise(text)
    realised = set()
    for attr in STRINGS:
        if attr in mr:
            t, found = _without(t, mr[attr])
            if found:
                realised.add(attr)
    out: dict[str, set[str]] = {}
    for attr, classes in _COMPILED.items():
        found: set[str] = set()
        rest = t
        for cls, rx in classes.items():  # in order (see CONSUME)
            if rx.search(rest):
                if cls not in NEUTRAL.get(attr, ()):
                    found.add(cls)
                if attr in CONSUME:
                    rest = rx.sub(" | ", rest)
        out[attr] = found
    return out, realised


def slot_errors(mr: str | dict[str, str], text: str) -> SlotErrors:
    """The slot errors of ``text`` as a realisation of ``mr`` (an MR string or its parsed dict)."""
    attrs = parse_mr(mr) if isinstance(mr, str) else dict(mr)
    said, realised = _read(text, attrs)
    missing, wrong, added = [], [], []
    for attr, value in attrs.items():
        if attr in STRINGS:
            if attr not in realised:
                missing.append(attr)
            continue
        if attr not in PATTERNS:
            continue  # an attribute this module has no forms for: counted as a slot, never an error
        own = _classes(attr, value)
        generic = GENERIC.get(attr, set())
        if said[attr] - {own} - generic:
            wrong.append(attr)  # another value stated, instead of the MR's or beside it
        elif own not in said[attr]:
            missing.append(attr)
    for attr, classes in said.items():
        if attr not in attrs and classes - GENERIC.get(attr, set()):
            added.append(attr)
    return SlotErrors(len(attrs), tuple(missing), tuple(wrong), tuple(added))


def slot_error_rate(mrs: Sequence[str | dict[str, str]], texts: Iterable[str]) -> dict[str, float | int]:
    """Totals over outputs: slots, missing, wrong, added, and ``ser`` = 100 * errors / slots (percent)."""
    return totals(slot_errors(mr, text) for mr, text in zip(mrs, texts, strict=True))


def totals(outputs: Iterable[SlotErrors]) -> dict[str, float | int]:
    """:func:`slot_error_rate` of outputs already scored."""
    total = {"slots": 0, "missing": 0, "wrong": 0, "added": 0}
    for e in outputs:
        total["slots"] += e.slots
        total["missing"] += len(e.missing)
        total["wrong"] += len(e.wrong)
        total["added"] += len(e.added)
    errors = total["missing"] + total["wrong"] + total["added"]
    return {**total, "ser": 100 * errors / total["slots"] if total["slots"] else 0.0}
