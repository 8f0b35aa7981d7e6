"""The embedded task of ``secfwt demo``: is a sentence about the past or the future? (160 sentences.)

80 hand-written minimal pairs (written for secfwt; no dataset text): the same event told in the past tense
(label 0) and as something still to come (label 1), 6 to 12 tokens each with the MiniLM tokenizer. A pair is
never split: every fourth pair (pairs 0, 4, 8, ...: 20 pairs, 40 sentences) forms the train pool (the k-shot
train and dev sets are sampled from it), the other 60 pairs the held-out test split (120 sentences, 60 per
class). The task's template alone is deliberately poorly calibrated (its label descriptions "long ago" and
"tomorrow" pull most sentences to "tomorrow"; README, "secfwt demo"): that is what a few generations of
forward-only tuning can fix.
"""

from __future__ import annotations

PAIRS: tuple[tuple[str, str], ...] = (
    ("we visited grandma last weekend", "we will visit grandma next weekend"),
    ("the storm knocked down three trees", "the storm will knock down trees"),
    ("she finished the report before lunch", "she will finish the report after lunch"),
    ("they sold the old car in june", "they are going to sell the old car"),
    ("i lost my keys on the bus", "i will pick up my keys tonight"),
    ("the team won the final", "the team will play the final"),
    ("he cooked dinner for everyone", "he is going to cook dinner for everyone"),
    ("the children played in the snow", "the children will play in the snow"),
    ("we missed the train", "we will catch the early train"),
    ("the museum closed early on monday", "the museum will close early on monday"),
    ("my brother painted the kitchen", "my brother will paint the kitchen"),
    ("the shop ran out of bread", "the shop will bake more bread"),
    ("she wrote to her aunt", "she will write to her aunt soon"),
    ("the river flooded the fields", "the river will flood the fields"),
    ("they moved to a new house", "they are going to move house"),
    ("i read the whole book in one night", "i will read the book this weekend"),
    ("the band played until midnight", "the band will play until midnight"),
    ("he broke his arm skiing", "he is going to learn to ski"),
    ("we planted tomatoes in the garden", "we will plant tomatoes in the garden"),
    ("the teacher explained the problem twice", "the teacher will explain the problem tomorrow"),
    ("the dog chased the cat", "the dog will need a walk later"),
    ("my parents met at a dance", "my parents will travel to the city"),
    ("the plane landed an hour late", "the plane will land in an hour"),
    ("she forgot her umbrella", "she will bring her umbrella"),
    ("we watched the sunset from the hill", "we will watch the sunset from the hill"),
    ("the company opened a second office", "the company will open a second office"),
    ("i called the doctor on tuesday", "i will call the doctor on tuesday"),
    ("the kids built a sandcastle", "the kids will build a sandcastle"),
    ("the old bridge collapsed in the flood", "the new bridge will open in summer"),
    ("he sang at his sister's wedding", "he will sing at his sister's wedding"),
    ("the baker opened his shop at five", "the baker will open his shop at five"),
    ("we cleaned the house on saturday", "we are going to clean the house"),
    ("my friend sent me a postcard", "my friend will send me a postcard"),
    ("the farmer sold his apples", "the farmer will sell his apples"),
    ("the concert ended with fireworks", "the concert will end with fireworks"),
    ("she learned to drive at eighteen", "she will learn to drive next year"),
    ("the workers fixed the roof", "the workers will fix the roof"),
    ("i met an old friend at the station", "i will meet an old friend at the station"),
    ("the cat slept on the sofa all day", "the cat will sleep on the sofa"),
    ("our neighbours threw a big party", "our neighbours are going to throw a party"),
    ("the mayor gave a speech", "the mayor will give a speech"),
    ("we spent the holidays by the lake", "we will spend the holidays by the lake"),
    ("the students passed the exam", "the students will take the exam on friday"),
    ("he repaired the bike in an hour", "he will repair the bike this evening"),
    ("the library lent me five books", "the library will lend me five books"),
    ("the wind blew the fence over", "the wind will pick up tonight"),
    ("i baked a cake for her birthday", "i am going to bake a cake for her"),
    ("the film won three prizes", "the film will open next month"),
    ("she ran the marathon in four hours", "she will run the marathon in autumn"),
    ("the town built a new school", "the town will build a new school"),
    ("we drove to the coast on sunday", "we will drive to the coast on sunday"),
    ("the guests arrived after eight", "the guests will arrive after eight"),
    ("my sister bought a red coat", "my sister is going to buy a red coat"),
    ("the police closed the road", "the police will close the road"),
    ("the orchestra rehearsed all morning", "the orchestra will rehearse all morning"),
    ("grandpa told us a story", "grandpa will tell us a story"),
    ("the ship left the harbour at dawn", "the ship will leave the harbour at dawn"),
    ("i answered all the emails", "i will answer all the emails"),
    ("the club elected a new president", "the club will elect a new president"),
    ("the price of milk went up", "the price of milk will go up"),
    ("we climbed the mountain", "we are going to climb the mountain"),
    ("the child drew a horse", "the child will draw a horse"),
    ("the city planted a hundred trees", "the city will plant a hundred trees"),
    ("he sold his guitar", "he will sell his guitar"),
    ("the restaurant changed its menu", "the restaurant will change its menu"),
    ("the rain stopped around midnight", "the rain will stop around midnight"),
    ("my aunt visited us at christmas", "my aunt will visit us at christmas"),
    ("the doctor checked my blood pressure", "the doctor will check my blood pressure"),
    ("the kids fed the ducks", "the kids are going to feed the ducks"),
    ("she painted the door blue", "she will paint the door blue"),
    ("the team trained in the heat", "the team will train in the heat"),
    ("we booked a table for four", "we will book a table for four"),
    ("the lights went out", "the lights will go out"),
    ("the old man walked his dog", "the old man will walk his dog"),
    ("i finished the puzzle", "i will finish the puzzle"),
    ("the bus broke down near the school", "the bus will stop near the school"),
    ("the shop gave us a discount", "the shop will give us a discount"),
    ("we celebrated her promotion", "we will celebrate her promotion"),
    ("the roses flowered early", "the roses will flower early"),
    ("he wrote his first novel in a cabin", "he will write his next novel in a cabin"),
)

POOL_EVERY = 4  # pair i is in the train pool when i % POOL_EVERY == 0


def tense_split(split: str) -> list[tuple[str, int]]:
    """The ``train`` pool (40 sentences) or ``test`` split (120), as ``(text, label)`` pairs, past then future
    of each pair (label 0 = past, 1 = future)."""
    if split not in ("train", "test"):
        raise ValueError(f"tense split must be 'train' or 'test', got {split!r}")
    in_pool = split == "train"
    out: list[tuple[str, int]] = []
    for i, (past, future) in enumerate(PAIRS):
        if (i % POOL_EVERY == 0) == in_pool:
            out += [(past, 0), (future, 1)]
    return out
