"""Text derived from a scene's ground truth: reference captions, RSVQA questions of
every published type, and referring expressions that single out exactly one object.

Everything said here is visible in the pixels (counts, colours, positions, land use),
so the language can be learned only by looking.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .scene import LAND_USES, PLURAL, Scene, SceneObject

NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _count_phrase(n: int, category: str) -> str:
    return f"{NUMBERS[n] if n < len(NUMBERS) else n} {category if n == 1 else PLURAL[category]}"


def region(obj: SceneObject) -> str:
    """Where the object's centre lies in a 3 x 3 partition of the image."""
    x, y = obj.centre
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    return f"{row} {col}".strip() or "centre"


def _where(obj: SceneObject) -> str:
    r = region(obj)
    return "in the centre" if r == "centre" else f"at the {r}"


# ---------------------------------------------------------------- captions
def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` different reference captions: scene-level, counts with colours, relations."""
    counts = Counter(o.category for o in scene.objects)
    lu = scene.land_use
    place = {"river": "a river", "beach": "a beach", "harbour": "a harbour", "airport": "an airport",
             "industrial": "an industrial area", "residential": "a residential area", "parking lot": "a parking lot",
             "sports field": "a sports field", "farmland": "farmland", "forest": "a forest", "desert": "a desert",
             "meadow": "a meadow"}[lu]
    things = [_count_phrase(c, cat) for cat, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    listing = " and ".join([", ".join(things[:-1]), things[-1]]) if len(things) > 1 else (things[0] if things else "")
    out: list[str] = []
    if things:
        verb = "is" if len(scene.objects) == 1 else "are"
        out += [f"{listing} {verb} in {place}.", f"this is {place} with {listing}.",
                f"there {verb} {listing} in {place}."]
    else:
        out += [f"this is {place}.", f"{place} with nothing else in it.", f"an image of {place} without any objects."]
    if scene.roads:
        out.append(f"a road crosses {place}" + (f" with {listing}." if things else "."))
    if scene.water and lu != "river":
        out.append(f"{place} next to the water" + (f" with {listing}." if things else "."))
    for obj in sorted(scene.objects, key=lambda o: -o.area)[:3]:
        out.append(f"a {obj.colour} {obj.category} is {_where(obj)} of {place}.")
    if len(scene.objects) >= 2:
        a, b = sorted(scene.objects, key=lambda o: o.centre[0])[:2]
        if b.centre[0] - a.centre[0] > 0.15:
            out.append(f"a {a.colour} {a.category} is to the left of a {b.colour} {b.category}.")
    colours = Counter((o.colour, o.category) for o in scene.objects)
    if colours:
        (colour, cat), k = colours.most_common(1)[0]
        out.append(f"{place} with {_count_phrase(k, cat).replace(' ', f' {colour} ', 1)}." if k > 1
                   else f"{place} with a {colour} {cat}.")
    out = list(dict.fromkeys(out))  # distinct, in order
    idx = rng.permutation(len(out))[:n]
    picked = [out[i] for i in sorted(idx)]
    while len(picked) < n:  # few facts to tell: repeat with another wording
        picked.append(f"an aerial image of {place}" + (f" with {listing}." if things else "."))
    return picked[:n]


# ---------------------------------------------------------------- VQA
AREA_BINS = [(0, "0m2"), (10, "between 0m2 and 10m2"), (100, "between 10m2 and 100m2"),
             (1000, "between 100m2 and 1000m2"), (float("inf"), "more than 1000m2")]


def _area_answer(m2: float) -> str:
    if m2 <= 0:
        return "0m2"
    return next(label for limit, label in AREA_BINS[1:] if m2 <= limit)


def questions(scene: Scene, rng: np.random.Generator, types: tuple[str, ...], n: int,
              metres_per_image: float = 77.0) -> list[tuple[str, str, str]]:
    """`n` (question, answer, type) triples, types drawn evenly, yes/no answers balanced."""
    present = sorted({o.category for o in scene.objects})
    possible = sorted({c for lu in LAND_USES.values() for c in lu["objects"]})
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for i in range(n * 3):
        if len(out) >= n:
            break
        qtype = types[i % len(types)]
        want_yes = rng.random() < 0.5
        if qtype == "presence":
            pool = present if (want_yes and present) else [c for c in possible if c not in present] or possible
            cat = str(rng.choice(pool))
            q = str(rng.choice([f"is there a {cat}?", f"are there {PLURAL[cat]}?",
                                f"is a {cat} present in the image?"]))
            a = "yes" if scene.count(cat) else "no"
        elif qtype == "comp":
            a_cat, b_cat = (str(c) for c in rng.choice(possible, size=2, replace=False))
            na, nb = scene.count(a_cat), scene.count(b_cat)
            form = int(rng.integers(0, 3))
            if form == 0:
                q, a = f"are there more {PLURAL[a_cat]} than {PLURAL[b_cat]}?", "yes" if na > nb else "no"
            elif form == 1:
                q, a = f"are there less {PLURAL[a_cat]} than {PLURAL[b_cat]}?", "yes" if na < nb else "no"
            else:
                q, a = f"is the number of {PLURAL[a_cat]} equal to the number of {PLURAL[b_cat]}?", \
                    "yes" if na == nb else "no"
        elif qtype == "rural_urban":
            q, a = str(rng.choice(["is it a rural or an urban area?", "is this an urban or a rural area?"])), \
                "urban" if scene.urban else "rural"
        elif qtype == "count":
            cat = str(rng.choice(present if present and rng.random() < 0.8 else possible))
            q, a = str(rng.choice([f"how many {PLURAL[cat]} are there?",
                                   f"what is the number of {PLURAL[cat]}?"])), str(scene.count(cat))
        elif qtype == "area":
            cat = str(rng.choice(present if present else possible))
            m2 = sum(o.area for o in scene.objects if o.category == cat) * metres_per_image ** 2
            q, a = f"what is the area covered by {PLURAL[cat]}?", _area_answer(m2)
        else:
            raise ValueError(f"unknown question type {qtype!r}")
        if q not in seen:
            seen.add(q)
            out.append((q, a, qtype))
    return out


# ---------------------------------------------------------------- referring expressions
def _describe_options(obj: SceneObject, scene: Scene) -> list[tuple[str, callable]]:
    """Candidate expressions for `obj`, each with the predicate it asserts."""
    cat, col, reg = obj.category, obj.colour, region(obj)
    same = [o for o in scene.objects if o.category == cat]
    opts = [
        (f"the {cat}", lambda o: o.category == cat),
        (f"the {col} {cat}", lambda o: o.category == cat and o.colour == col),
        (f"the {cat} {_where(obj)}", lambda o: o.category == cat and region(o) == reg),
        (f"the {col} {cat} {_where(obj)}", lambda o: o.category == cat and o.colour == col and region(o) == reg),
    ]
    if len(same) >= 2:
        big = max(same, key=lambda o: o.area)
        small = min(same, key=lambda o: o.area)
        if obj is big and big.area > 1.4 * sorted(o.area for o in same)[-2]:
            opts.append((f"the largest {cat}", lambda o: o is obj))
        if obj is small and small.area * 1.4 < sorted(o.area for o in same)[1]:
            opts.append((f"the smallest {cat}", lambda o: o is obj))
        left = min(same, key=lambda o: o.centre[0])
        if obj is left and sorted(o.centre[0] for o in same)[1] - obj.centre[0] > 0.1:
            opts.append((f"the leftmost {cat}", lambda o: o is obj))
    if scene.roads and cat not in ("ship", "bridge"):
        d, p = scene.roads[0]
        if d == "h":
            side = "above" if obj.centre[1] < p else "below"
        else:
            side = "left of" if obj.centre[0] < p else "right of"
        opts.append((f"the {col} {cat} {side} the road",
                     lambda o, d=d, p=p, side=side: o.category == cat and o.colour == col and
                     ((("above" if o.centre[1] < p else "below") if d == "h" else
                       ("left of" if o.centre[0] < p else "right of")) == side)))
    return opts


def referring_expression(obj: SceneObject, scene: Scene, rng: np.random.Generator) -> str | None:
    """An expression that matches `obj` and no other object, or None if none does."""
    unique = [text for text, pred in _describe_options(obj, scene)
              if sum(bool(pred(o)) for o in scene.objects) == 1 and pred(obj)]
    if not unique:
        return None
    # Prefer richer expressions (attributes and positions), as the real sets do.
    weights = np.array([1.0 + len(t.split()) for t in unique])
    return unique[int(rng.choice(len(unique), p=weights / weights.sum()))]
