"""Slot errors (missing, wrong, added) and the slot error rate, on hand-made E2E outputs."""

from __future__ import annotations

import pytest

from lora_dist.slots import parse_mr, slot_error_rate, slot_errors

FULL = ("name[The Punter], eatType[coffee shop], food[English], priceRange[moderate], customer rating[3 out of 5], "
        "area[riverside], familyFriendly[no], near[Café Sicilia]")

# (MR, output, missing, wrong, added)
CASES = [
    # everything realised, in the references' own words
    (FULL, "The Punter is a moderately priced coffee shop by the riverside near Café Sicilia. It serves English "
           "food, has a customer rating of 3 out of 5 and is not family-friendly.", [], [], []),
    # the opposite of the MR's value: family-friendly for familyFriendly[no]
    (FULL, "The Punter is a family-friendly coffee shop by the riverside near Café Sicilia. It serves English "
           "food at moderate prices and is rated 3 out of 5.", [], ["familyFriendly"], []),
    # attributes dropped: the food, the rating, family-friendliness
    (FULL, "The Punter is a moderately priced coffee shop by the riverside near Café Sicilia.",
     ["food", "customer rating", "familyFriendly"], [], []),
    # a value stated that the MR does not have, another contradicted
    ("name[Aromi], eatType[coffee shop], area[city centre]",
     "Aromi is a cheap coffee shop by the river.", [], ["area"], ["priceRange"]),
    # repeats are not slot errors; the value is realised
    ("name[Cotto], priceRange[moderate]", "Cotto is moderately priced, moderately priced.", [], [], []),
    # 5 out of 5 for 3 out of 5; "high customer rating" for a low one
    ("name[Cotto], customer rating[3 out of 5]", "Cotto is rated 5 out of 5.", [], ["customer rating"], []),
    ("name[Cotto], customer rating[1 out of 5]", "Cotto has a high customer rating.", [], ["customer rating"], []),
    ("name[Cotto], customer rating[low]", "Cotto has a 1 out of 5 rating and poor reviews.", [], [], []),
    # the MR's near string is not an attribute: Café Sicilia is no coffee shop, Burger King no fast food
    ("name[Clowns], near[Café Sicilia]", "Clowns is near Café Sicilia.", [], [], []),
    ("name[Clowns], food[English], near[Burger King]", "Clowns serves English food near Burger King.", [], [], []),
    # "restaurant" is any place: it realises no specific eat type and adds none
    ("name[Clowns], eatType[pub]", "Clowns is a restaurant.", ["eatType"], [], []),
    ("name[Clowns], food[Chinese]", "Clowns is a Chinese restaurant.", [], [], []),
    # the name is missing; the price stated in pounds
    ("name[Fitzbillies], priceRange[more than £30]", "This place costs more than £30.", ["name"], [], []),
    ("name[The Mill], priceRange[less than £20], familyFriendly[yes]",
     "The Mill is a kid friendly place with food for less than £20.", [], [], []),
    ("name[The Mill], priceRange[high]", "Mill is not expensive.", [], ["priceRange"], []),
    # phrasings a first version misread (a review's probes)
    ("name[Cotto], customer rating[1 out of 5]", "Cotto is rated 1 out of 5 stars.", [], [], []),
    ("name[Cotto], customer rating[low]", "Cotto is not highly rated.", [], [], []),
    ("name[Cotto], customer rating[average]", "Cotto has a moderate customer rating.", [], [], []),
    ("name[Cotto], customer rating[average], priceRange[high]", "Cotto has a moderate rating and high prices.",
     [], [], []),
    ("name[Cotto], food[Chinese], priceRange[less than £20]",
     "Cotto serves Chinese food priced less than 20 British Pounds.", [], [], []),
    ("name[Cotto], familyFriendly[no]", "Cotto is not family-friendly or kid-friendly.", [], [], []),
    ("name[Cotto], familyFriendly[no]", "Cotto is not a good choice for families.", [], [], []),
    ("name[Cotto], familyFriendly[no]", "At Cotto children are not welcome.", [], [], []),
    ("name[Cotto], familyFriendly[yes]", "At Cotto children are welcome.", [], [], []),
    ("name[Cotto], priceRange[high]", "Cotto's price range is high.", [], [], []),
    ("name[Cotto], priceRange[£20-25]", "Cotto costs £20–£25.", [], [], []),
    ("name[Cotto], priceRange[cheap]", "Cotto isn't expensive.", [], [], []),
    ("name[Cotto], area[riverside]", "Cotto is outside the city centre, by the river.", [], [], []),
    ("name[Cotto]", "Cotto is highly recommended.", [], [], []),
    ("name[Cotto], near[Café Sicilia]", "Cotto is near Cafe Sicilia.", [], [], []),  # accents folded
]


@pytest.mark.parametrize("mr,text,missing,wrong,added", CASES)
def test_slot_errors_on_hand_made_outputs(mr, text, missing, wrong, added):
    e = slot_errors(mr, text)
    assert (sorted(e.missing), sorted(e.wrong), sorted(e.added)) == (sorted(missing), sorted(wrong), sorted(added))
    assert e.slots == len(parse_mr(mr))


def test_the_rate_is_errors_over_slots_and_each_output_reports_its_own():
    mrs = [FULL, "name[Aromi], eatType[coffee shop], area[city centre]"]
    texts = ["The Punter is a moderately priced coffee shop by the riverside near Café Sicilia.",
             "Aromi is a cheap coffee shop by the river."]
    total = slot_error_rate(mrs, texts)
    assert total == {"slots": 11, "missing": 3, "wrong": 1, "added": 1, "ser": pytest.approx(100 * 5 / 11)}
    one = slot_errors(mrs[1], texts[1]).to_dict()
    assert one == {"slots": 3, "missing": [], "wrong": ["area"], "added": ["priceRange"],
                   "ser": pytest.approx(100 * 2 / 3)}  # percent, as lora-dist eval reports SER


def test_a_malformed_mr_is_named():
    assert parse_mr("name[Aromi], customer rating[5 out of 5]") == {"name": "Aromi", "customer rating": "5 out of 5"}
    with pytest.raises(ValueError, match="not an E2E meaning representation"):
        parse_mr("name=Aromi")
    with pytest.raises(ValueError):
        slot_error_rate(["name[A]"], ["A", "B"])  # outputs and MRs must pair up
