"""An embedded demo task: 64 short hand-written movie-review sentences (32 negative, 32 positive).

It lets every tuning code path run without the real datasets in ``../shared/data``. The first 20 sentences
of each class form the train pool (k-shot train and dev are sampled from it), the last 12 the test split.
Labels: 0 = negative, 1 = positive.
"""

from __future__ import annotations

from secfwt.tuning.demo_tense import tense_split

NEGATIVE: tuple[str, ...] = (
    "a dull , lifeless film that drags on forever .",
    "the plot makes no sense and the acting is wooden .",
    "i was bored from the first scene to the last .",
    "a tedious mess with nothing to say .",
    "the jokes fall flat and the characters are annoying .",
    "an ugly , cynical movie that wastes its cast .",
    "painfully slow and completely forgettable .",
    "the dialogue is clumsy and the story is predictable .",
    "a waste of two hours .",
    "the worst film i have seen this year .",
    "it is loud , stupid and far too long .",
    "nothing works in this sloppy sequel .",
    "the director seems to have lost interest halfway through .",
    "a boring and pointless remake .",
    "the script is lazy and the ending is awful .",
    "i could not wait for it to end .",
    "flat performances sink this weak comedy .",
    "a confused , joyless experience .",
    "the special effects cannot save this dreadful story .",
    "an embarrassing film that should never have been made .",
    "the pacing is terrible and the music is grating .",
    "a shallow , irritating movie .",
    "dull characters stuck in a dull plot .",
    "this thriller has no thrills at all .",
    "a miserable failure on every level .",
    "the humor is crude and the romance is lifeless .",
    "an incoherent and exhausting film .",
    "poorly written , poorly acted and poorly directed .",
    "a bland movie that leaves no impression .",
    "the cast looks bored and so was i .",
    "a disappointing mess from start to finish .",
    "it is hard to imagine a worse way to spend an evening .",
)

POSITIVE: tuple[str, ...] = (
    "a warm , funny and beautifully acted film .",
    "the story is gripping and the ending is perfect .",
    "one of the best movies of the year .",
    "a delightful comedy full of charm .",
    "the performances are superb and moving .",
    "an inventive , thrilling adventure .",
    "i loved every minute of it .",
    "a smart , touching and memorable film .",
    "the director delivers a stunning achievement .",
    "a joyful movie that will make you smile .",
    "brilliant writing and wonderful acting .",
    "a moving portrait of a family in crisis .",
    "it is fresh , clever and endlessly entertaining .",
    "a gorgeous film with a great heart .",
    "the cast is excellent and the script is sharp .",
    "an absolute pleasure to watch .",
    "a powerful and beautifully made drama .",
    "the best sequel i have ever seen .",
    "funny , sweet and surprisingly wise .",
    "a masterpiece of suspense .",
    "the music is lovely and the images are breathtaking .",
    "a charming , heartfelt story .",
    "smart characters in a wonderful plot .",
    "this thriller keeps you on the edge of your seat .",
    "a triumph on every level .",
    "the humor is clever and the romance is sweet .",
    "an engaging and uplifting film .",
    "well written , well acted and well directed .",
    "a rich movie that stays with you .",
    "the cast is having fun and so was i .",
    "a satisfying delight from start to finish .",
    "it is hard to imagine a better way to spend an evening .",
)

N_TRAIN_PER_CLASS = 20


def demo_split(split: str) -> list[tuple[str, int]]:
    """The ``train`` pool (40 sentences) or ``test`` split (24 sentences) as ``(text, label)`` pairs; ``tense/train``
    and ``tense/test``: the past-or-future task of ``secfwt demo`` (:mod:`secfwt.tuning.demo_tense`)."""
    if split.startswith("tense/"):
        return tense_split(split.removeprefix("tense/"))
    if split == "train":
        neg, pos = NEGATIVE[:N_TRAIN_PER_CLASS], POSITIVE[:N_TRAIN_PER_CLASS]
    elif split == "test":
        neg, pos = NEGATIVE[N_TRAIN_PER_CLASS:], POSITIVE[N_TRAIN_PER_CLASS:]
    else:
        raise ValueError(f"demo split must be 'train' or 'test', got {split!r}")
    out: list[tuple[str, int]] = []
    for a, b in zip(neg, pos, strict=True):
        out += [(a, 0), (b, 1)]
    return out
