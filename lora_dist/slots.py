"""Slot errors of an E2E output against its meaning representation (MR).

For every attribute of the MR: is its value realised in the output (``missing`` when not), is
another value of that attribute stated instead or as well (``wrong``: "family-friendly" for
``familyFriendly[no]``, "cheap" for ``priceRange[high]``), and is any attribute stated that the MR
does not have (``added``: a rating, a price, an area, an eat type, a food or family-friendliness
the MR leaves out). The slot error rate is

    SER = (missing + wrong + added) / slots

over every attribute of every MR, as in the E2E challenge's slot-error scripts (Dušek et al.).
Values are recognised by the surface forms the E2E references use for them (regular
expressions below, on lower-cased text with hyphens between words read as spaces); the MR's own
``name`` and ``near`` strings are removed before the other attributes are looked for, so that
"Café Sicilia" is not a coffee shop and "Burger King" not fast food. ``name`` and ``near`` are
realised when their string appears (a leading "The" optional); they cannot be wrong or added.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

# attribute -> class -> patterns. Values of the MR map to a class through CLASS_OF; an attribute
# is "stated" with every class one of whose patterns matches.
_RATED = r"(?:customer |consumer |user |food |guest )?(?:ratings?|rated|reviews?|reviewed|scores?|stars?)"
PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "familyFriendly": {
        # "no" is looked for first and its matches removed, since "not family friendly" holds
        # "family friendly"
        "no": (r"\b(?:not|isn't|isnt|is not|aren't|are not|never) (?:a |very |really |particularly |too |that |so "
               r"|exactly )?(?:family|kids?|child|children)(?:'s)? ?(?:friendly|oriented)",
               r"\bnon ?(?:family|kids?|child|children)(?:'s)? ?friendly",
               r"\bno (?:family|kids?|child|children)(?:'s)? ?friendly",
               r"\b(?:family|kids?|child|children) ?unfriendly",
               r"\b(?:isn't|is not|not|aren't|are not) (?:suitable|good|ideal|recommended|appropriate|meant|aimed|"
               r"geared|great|a place|the place|somewhere|a good place) (?:\w+ ){0,3}?(?:for )?"
               r"(?:families|family|kids|children|child)",
               r"\b(?:doesn't|does not|don't|do not|won't|will not) (?:\w+ )?(?:welcome|allow|cater (?:for|to)|accept|"
               r"accommodate|admit|serve) (?:\w+ )?(?:families|family|kids|children)",
               r"\bno (?:kids|children|families)", r"\badults? only", r"\bonly for adults",
               r"\bfor adults", r"\badult (?:audience|crowd|clientele|only)"),
        "yes": (r"\b(?:family|kids?|child|children)(?:'s)? ?(?:friendly|oriented)",
                r"\b(?:welcomes?|welcoming|allows?|caters? (?:for|to)|accepts?|accommodates?|suitable for|good for|"
                r"great for|ideal for|perfect for|fun for|open to) (?:\w+ )?(?:families|family|kids|children)",
                r"\bfor (?:the (?:whole |entire )?)?famil(?:y|ies)\b", r"\bfamily (?:place|venue|restaurant|spot)"),
    },
    "priceRange": {
        "low": (r"\bcheap", r"\binexpensive", r"\blow(?:er)?[ -]?(?:cost|price|priced|prices|pricing|budget)",
                r"\baffordabl", r"\bless than (?:£|l)?20", r"\bunder (?:£|l)?20", r"\bbudget", r"\bbargain",
                r"\bnot (?:too |very |that |so )?(?:expensive|pricey|costly)", r"\blow cost"),
        "mid": (r"\bmoderate(?:ly)?", r"\bmid(?:dle)?[ -]?(?:range|price|priced|prices|cost|level)",
                r"\bmedium[ -]?(?:price|priced|prices|cost)", r"\baverage[ -]?(?:price|priced|prices|cost|pricing)",
                r"£?20 ?(?:-|to|and) ?£?25", r"\breasonabl", r"\bfair(?:ly)? price"),
        "high": (r"(?<!in)(?<!not )(?<!not too )(?<!not very )expensive", r"\bhigh(?:er)?[ -]?(?:cost|price|priced|"
                 r"prices|pricing|end)", r"\bpricey", r"\bpricy", r"\bcostly", r"\bmore than (?:£|l)?30",
                 r"\bover (?:£|l)?30", r"\bupscale", r"\bluxur", r"\bpremium", r"\bhigh price range",
                 r"£30 ?(?:\+|or more|and (?:up|over|above))"),
    },
    "customer rating": {
        "low": (r"\b(?:1|one) (?:out of|out|of) (?:5|five)", r"\b(?:1|one)[ -]?starr?(?:ed|s)?\b",
                r"\blow(?:ly)?[ -]?" + _RATED, r"\b(?:poor(?:ly)?|bad(?:ly)?|terrible|negative|low) " + _RATED,
                r"\b(?:ratings?|rated|rates?|reviews?|reviewed|scores?) (?:it |them |is |are |of |as |very |quite |rather "
                r"|pretty ){0,3}(?:low|poor|poorly|bad|badly|terrible|negative)\b", r"\bpoor(?:ly)? rated", r"\bnot (?:well|highly) rated"),
        "average": (r"\b(?:3|three) (?:out of|out|of) (?:5|five)", r"\b(?:3|three)[ -]?starr?(?:ed|s)?\b",
                    r"\baverage[ -]?" + _RATED, r"\b(?:mediocre|middling|moderate|okay|ok|decent|fair) " + _RATED,
                    r"\b(?:ratings?|rated|rates?|reviews?|reviewed|scores?) (?:it |them |is |are |of |as |an |a ){0,3}"
                    r"(?:average|mediocre|okay|moderate|decent)\b", r"\baverage(?:ly)? rated"),
        "high": (r"\b(?:5|five) (?:out of|out|of) (?:5|five)", r"\b(?:5|five)[ -]?starr?(?:ed|s)?\b",
                 r"\bhigh(?:ly)?[ -]?" + _RATED, r"\b(?:excellent|great|outstanding|top|good|positive|"
                 r"superb|stellar|glowing|high) " + _RATED,
                 r"\b(?:ratings?|rated|rates?|reviews?|reviewed|scores?) (?:it |them |is |are |of |as |very |quite "
                 r"|rather |pretty ){0,3}(?:high|highly|excellent|great|good|outstanding|top)\b", r"\b(?:highly|well) (?:rated|regarded|"
                 r"reviewed|recommended)"),
    },
    "area": {
        "city centre": (r"\bcity cent(?:re|er)", r"\bcent(?:re|er) of (?:the )?(?:city|town)", r"\bdowntown",
                        r"\bcentral", r"\btown cent(?:re|er)", r"\bcity's cent(?:re|er)", r"\bin the centre\b",
                        r"\bin the center\b"),
        "riverside": (r"\briver", r"\bwaterfront", r"\bwater's edge", r"\bby the water"),
    },
    "eatType": {
        "coffee shop": (r"\bcoffee ?(?:shop|house)s?", r"\bcaf(?:e|é)s?\b", r"\bcoffee place"),
        "pub": (r"\bpubs?\b", r"\binn\b", r"\btavern", r"\bbar\b"),
        "restaurant": (r"\brestaurants?\b", r"\beatery", r"\bdiner\b", r"\bbistro"),
    },
    "food": {
        "chinese": (r"\bchinese",),
        "english": (r"\benglish", r"\bbritish"),
        "fast food": (r"\bfast ?food", r"\bburgers?\b", r"\bfries\b"),
        "french": (r"\bfrench",),
        "indian": (r"\bindian", r"\bcurr(?:y|ies)"),
        "italian": (r"\bitalian", r"\bpizza", r"\bpasta"),
        "japanese": (r"\bjapanese", r"\bsushi"),
    },
}
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
    text = text.lower().replace("’", "'")
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # family-friendly -> family friendly
    return re.sub(r"\s+", " ", text)


def _without(text: str, phrase: str) -> tuple[str, bool]:
    """``text`` with every occurrence of ``phrase`` (or of it without a leading "the ") blanked,
    and whether there was one."""
    variants = {_normalise(phrase)}
    if phrase.lower().startswith("the "):
        variants.add(_normalise(phrase[4:]))
    found = False
    for v in sorted(variants, key=len, reverse=True):
        if v and v in text:
            found = True
            text = text.replace(v, " | ")
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
                "added": list(self.added), "ser": self.errors / self.slots if self.slots else 0.0}


def stated(text: str, mr: dict[str, str]) -> dict[str, set[str]]:
    """Every attribute class ``text`` states (the MR's name and near strings removed first)."""
    t = _normalise(text)
    for attr in STRINGS:
        if attr in mr:
            t, _ = _without(t, mr[attr])
    out: dict[str, set[str]] = {}
    for attr, classes in _COMPILED.items():
        found: set[str] = set()
        rest = t
        for cls, rx in classes.items():  # dict order: familyFriendly's "no" before "yes"
            if rx.search(rest):
                found.add(cls)
                if attr == "familyFriendly" and cls == "no":
                    rest = rx.sub(" | ", rest)
        out[attr] = found
    return out


def slot_errors(mr: str | dict[str, str], text: str) -> SlotErrors:
    """The slot errors of ``text`` as a realisation of ``mr`` (an MR string or its parsed dict)."""
    attrs = parse_mr(mr) if isinstance(mr, str) else dict(mr)
    said = stated(text, attrs)
    t = _normalise(text)
    missing, wrong, added = [], [], []
    for attr, value in attrs.items():
        if attr in STRINGS:
            if not _without(t, value)[1]:
                missing.append(attr)
            continue
        if attr not in PATTERNS:
            continue  # an attribute this module has no forms for: counted as a slot, never an error
        own = _classes(attr, value)
        generic = GENERIC.get(attr, set())
        others = said[attr] - {own} - generic
        if own in said[attr]:
            if others:
                wrong.append(attr)  # stated, and contradicted
        elif others:
            wrong.append(attr)
        else:
            missing.append(attr)
    for attr, classes in said.items():
        if attr not in attrs and classes - GENERIC.get(attr, set()):
            added.append(attr)
    return SlotErrors(len(attrs), tuple(missing), tuple(wrong), tuple(added))


def slot_error_rate(mrs: Sequence[str | dict[str, str]], texts: Iterable[str]) -> dict[str, float | int]:
    """Totals over outputs: slots, missing, wrong, added, and SER = errors / slots."""
    total = {"slots": 0, "missing": 0, "wrong": 0, "added": 0}
    for mr, text in zip(mrs, texts, strict=True):
        e = slot_errors(mr, text)
        total["slots"] += e.slots
        total["missing"] += len(e.missing)
        total["wrong"] += len(e.wrong)
        total["added"] += len(e.added)
    errors = total["missing"] + total["wrong"] + total["added"]
    return {**total, "ser": errors / total["slots"] if total["slots"] else 0.0}
