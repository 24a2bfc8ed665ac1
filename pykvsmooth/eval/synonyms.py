"""The word lists CHAIR uses to find the 80 MSCOCO object categories in a caption.

Written for this package in the spirit of the list in Rohrbach et al.'s CHAIR code
(``LisaAnne/Hallucination``, ``data/synonyms.txt`` and the hard-coded rules in
``utils/chair.py``): every category with the nouns people use for it, and the multi-word
names that must be read as one object ("hot dog" is not a dog, "teddy bear" is not a
bear). Everything here is plain data; :mod:`pykvsmooth.eval.chair` turns it into a phrase
table. Entries are lower case and singular; plural forms are generated from them
(:data:`IRREGULAR_PLURALS` lists the exceptions to the spelling rules).

Where a word is ambiguous the choice follows the original list, so numbers stay comparable
with published CHAIR results: "orange" counts as the fruit, "mouse" as the computer mouse,
"seat" as a chair (unless a toilet is mentioned), "computer" and "notebook" as a laptop,
"bowl" as a bowl. Words the original did not have and that mostly name something else in
COCO captions were left out ("glass", "board", "glove", "bag", "fan", "couple").
"""

from __future__ import annotations

from collections.abc import Mapping

# category (the name in instances_val2014.json) -> every phrase that names it, the
# category name itself first. Singular forms only; a phrase may have several words.
COCO_SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "person": (
        "person", "people", "man", "woman", "boy", "girl", "child", "kid", "baby",
        "toddler", "infant", "adult", "teenager", "teen", "youngster", "lady", "gentleman",
        "guy", "male", "female", "human", "pedestrian", "passenger",
        "rider", "driver", "player", "athlete", "skier", "snowboarder", "surfer",
        "skater", "skateboarder", "biker", "cyclist", "bicyclist", "motorcyclist",
        "pitcher", "batter", "catcher", "umpire", "referee", "jockey", "worker", "chef",
        "baker", "waiter", "waitress", "vendor", "shopper", "customer", "tourist",
        "traveler", "spectator", "student", "teacher", "doctor", "nurse", "soldier",
        "officer", "policeman", "policewoman", "cop", "firefighter", "fireman", "farmer",
        "fisherman", "businessman", "businesswoman", "cowboy", "bride", "groom",
        "mother", "father", "mom", "dad", "son", "daughter", "brother", "sister",
        "grandmother", "grandfather", "husband", "wife", "hiker", "camper", "hunter",
        "walker",
    ),
    "bicycle": ("bicycle", "bike", "unicycle", "tricycle", "trike"),
    "car": (
        "car", "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "taxi",
        "taxicab", "jeep", "coupe", "limo", "limousine", "convertible",
    ),
    "motorcycle": (
        "motorcycle", "motorbike", "motor bike", "motor cycle", "dirt bike", "scooter",
        "moped",
    ),
    "airplane": (
        "airplane", "aeroplane", "air plane", "plane", "jet", "jetliner", "airliner",
        "aircraft", "airbus", "biplane", "seaplane", "passenger jet", "passenger plane",
        "jumbo jet",
    ),
    "bus": (
        "bus", "minibus", "school bus", "double decker", "double decker bus",
        "double deck bus", "passenger bus", "trolley",
    ),
    "train": (
        "train", "locomotive", "tram", "tramway", "streetcar", "caboose", "passenger train",
        "freight train", "subway train",
    ),
    "truck": (
        "truck", "pickup", "pickup truck", "lorry", "hauler", "firetruck", "fire truck",
        "dump truck", "semi truck",
    ),
    "boat": (
        "boat", "ship", "sailboat", "motorboat", "speedboat", "powerboat", "rowboat",
        "canoe", "kayak", "yacht", "ferry", "ferryboat", "dinghy", "raft", "catamaran",
        "barge", "tugboat", "houseboat", "fishing boat", "vessel", "steamboat", "gondola",
        "jet ski", "passenger ship",
    ),
    "traffic light": (
        "traffic light", "traffic signal", "stop light", "stoplight", "street light",
        "streetlight",
    ),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench", "park bench", "pew"),
    "bird": (
        "bird", "pigeon", "seagull", "gull", "duck", "duckling", "goose", "swan",
        "parrot", "parakeet", "owl", "eagle", "hawk", "falcon", "crow", "raven", "sparrow",
        "robin", "finch", "pelican", "heron", "egret", "flamingo", "penguin", "ostrich",
        "peacock", "rooster", "hen", "chicken", "turkey", "woodpecker", "hummingbird",
        "songbird", "seabird",
    ),
    "cat": ("cat", "kitten", "kitty", "feline", "tabby"),
    "dog": (
        "dog", "puppy", "pup", "doggy", "doggie", "canine", "hound", "terrier", "poodle",
        "retriever", "labrador", "bulldog", "beagle", "chihuahua", "dachshund", "collie",
        "corgi", "husky", "sheepdog", "greyhound", "pug", "spaniel",
    ),
    "horse": (
        "horse", "pony", "foal", "colt", "stallion", "mare", "racehorse", "bronco",
    ),
    "sheep": ("sheep", "lamb", "ram", "ewe", "goat"),
    "cow": (
        "cow", "cattle", "bull", "calf", "ox", "heifer", "buffalo", "bison",
    ),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly", "polar bear", "brown bear", "black bear", "panda"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "back pack", "knapsack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "hand bag", "purse", "wallet", "briefcase"),
    "tie": ("tie", "necktie", "bow tie"),
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee", "flying disc"),
    "skis": ("skis", "ski"),
    "snowboard": ("snowboard", "snow board"),
    "sports ball": (
        "sports ball", "ball", "soccer ball", "tennis ball", "beach ball", "volleyball",
    ),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": (
        "baseball glove", "baseball mitt", "mitt", "catcher mitt", "catchers mitt",
    ),
    "skateboard": ("skateboard", "skate board"),
    "surfboard": (
        "surfboard", "surf board", "longboard", "boogie board", "bodyboard", "wakeboard",
        "paddleboard",
    ),
    "tennis racket": ("tennis racket", "tennis racquet", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass", "champagne glass"),
    "cup": ("cup", "mug", "teacup", "coffee cup", "tea cup"),
    "fork": ("fork",),
    "knife": ("knife", "pocketknife"),
    "spoon": ("spoon", "teaspoon", "tablespoon"),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": (
        "sandwich", "burger", "hamburger", "cheeseburger", "sub", "panini",
    ),
    "orange": ("orange", "tangerine", "mandarin"),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake", "shortcake"),
    "chair": (
        "chair", "seat", "stool", "armchair", "highchair", "high chair", "rocking chair",
    ),
    "couch": ("couch", "sofa", "loveseat", "love seat", "settee", "futon", "recliner"),
    "potted plant": (
        "potted plant", "houseplant", "house plant", "plant", "flowerpot", "flower pot",
        "planter",
    ),
    "bed": ("bed", "bunk bed"),
    "dining table": (
        "dining table", "table", "desk", "dinner table", "kitchen table", "coffee table",
        "picnic table",
    ),
    "toilet": ("toilet", "urinal", "commode", "toilet bowl", "toilet seat", "potty"),
    "tv": (
        "tv", "television", "television set", "tv set", "flatscreen", "monitor",
        "computer monitor",
    ),
    "laptop": (
        "laptop", "laptop computer", "notebook computer", "notebook", "netbook",
        "macbook", "computer",
    ),
    "mouse": ("mouse", "computer mouse"),
    "remote": ("remote", "remote control", "controller", "game controller"),
    "keyboard": ("keyboard", "computer keyboard"),
    "cell phone": (
        "cell phone", "cellphone", "mobile phone", "phone", "smartphone", "telephone",
        "iphone",
    ),
    "microwave": ("microwave", "microwave oven"),
    "oven": ("oven", "stove", "stovetop", "stove top"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "textbook"),
    "clock": ("clock", "alarm clock", "wall clock"),
    "vase": ("vase",),
    "scissors": ("scissors", "scissor"),
    "teddy bear": (
        "teddy bear", "teddybear", "teddy", "stuffed bear", "stuffed animal",
        "plush toy",
    ),
    "hair drier": (
        "hair drier", "hair dryer", "hairdryer", "hairdrier", "blow dryer", "blowdryer",
    ),
    "toothbrush": ("toothbrush", "tooth brush"),
}

# Qualifiers that would otherwise be read as a person: "baby elephant" is an elephant, not
# a baby and an elephant, and "mother cat" is a cat (the original's animal_words rule;
# its vehicle_words rule is in the table: "passenger train"). Every
# "<qualifier> <synonym>" of these categories names the category.
PERSON_QUALIFIERS: tuple[str, ...] = ("baby", "adult", "male", "female", "mother")
QUALIFIED_CATEGORIES: tuple[str, ...] = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
)

# Phrases that contain an object word but name no object, so they must not count: "train
# tracks" are not a train, "home plate" is part of the field (from the original's double
# words), "baby animal" is neither a baby nor a category.
NON_OBJECT_PHRASES: tuple[str, ...] = (
    "train track", "railroad track", "home plate", "baby animal", "adult animal",
)

# word -> category: the word does not count while the category is mentioned in the same
# caption (the original's rule: with a toilet around, "seat" is the toilet's seat).
SUPPRESSED_BY: Mapping[str, str] = {"seat": "toilet"}

# Plurals the spelling rules in chair.pluralize() get wrong; a value equal to its key
# means the word is its own plural.
IRREGULAR_PLURALS: dict[str, str] = {
    "person": "people",
    "people": "people",
    "child": "children",
    "human": "humans",
    "mouse": "mice",
    "knife": "knives",
    "pocketknife": "pocketknives",
    "wife": "wives",
    "goose": "geese",
    "ox": "oxen",
    "calf": "calves",
    "sheep": "sheep",
    "cattle": "cattle",
    "bison": "bison",
    "buffalo": "buffaloes",
    "luggage": "luggage",
    "broccoli": "broccoli",
    "scissors": "scissors",
    "skis": "skis",
    "bus": "buses",
    "minibus": "minibuses",
    "fireman": "firemen",
}
