"""The text that the chat workloads (chat.py) are made of: data only, no logic.

`QUESTIONS` are typical chat questions, from a few words to a short paragraph, so that with
SmolLM2's chat template (which adds a default system prompt of about 30 tokens) a prompt is
about 35-100 tokens. `WARMUP_QUESTIONS` are kept apart: a warm-up never shares a prompt with
a measured request. Long prompts are notes written from `SUBJECTS` x `PREDICATES` (576
distinct sentences) followed by one of `NOTE_TASKS`.
"""

from __future__ import annotations

QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "What does a compiler do?",
    "Can you suggest a name for a grey cat?",
    "What is the difference between weather and climate?",
    "How do I boil an egg so that the yolk stays soft?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What are three good habits for getting better sleep?",
    "Explain what a prime number is to a ten-year-old.",
    "Write a haiku about the first snow of winter.",
    "Who wrote the play Romeo and Juliet, and roughly when?",
    "What is the boiling point of water at the top of a high mountain, and why does it change?",
    "Give me a short packing list for a two-day hiking trip in the mountains.",
    "How does a refrigerator keep food cold if it only uses electricity?",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Little Red Riding Hood in two sentences.",
    "Is it better to rent or to buy a home? Give me the main arguments on both sides.",
    "My houseplant's leaves are turning yellow at the edges. What could be wrong with it?",
    "Write a polite email asking my manager for a day off next Friday.",
    "What causes the seasons on Earth? Many people think it is the distance to the Sun.",
    "Suggest a simple vegetarian dinner I can cook in thirty minutes with rice and beans.",
    "How do vaccines train the immune system to recognise a virus?",
    "Explain the rules of chess for the knight and the bishop.",
    ("What should I consider when choosing my first programming language? I want to build "
     "small websites and maybe automate some boring tasks at work."),
    ("I have a job interview tomorrow for a junior accountant position. What questions are "
     "they likely to ask, and how should I prepare tonight?"),
    ("Write a short bedtime story about a turtle who wants to learn how to fly, for a "
     "four-year-old, with a happy ending."),
    ("My code throws 'IndexError: list index out of range' inside a for loop that removes "
     "items from the list it iterates over. Why does that happen and how do I fix it?"),
    ("Compare trains and planes for a 600 km trip: cost, time door to door, comfort and "
     "the environment. Which would you pick for a business trip?"),
    ("Explain in plain words what inflation is, why central banks raise interest rates to "
     "fight it, and who gains or loses when they do."),
    ("I want to start running but I get out of breath after two minutes. Can you give me a "
     "gentle plan for the first four weeks, three days a week?"),
    ("What is the difference between a virus and a bacterium, and why do antibiotics work "
     "against one but not the other?"),
    ("Write a limerick about a programmer who forgot to save their work before the power "
     "went out during a thunderstorm."),
    ("How did the printing press change Europe in the fifteenth and sixteenth centuries? "
     "Mention books, literacy and religion."),
    ("Give me five ideas for a birthday party for a twelve-year-old who loves science, "
     "with a small budget and a small flat."),
    ("Please explain recursion with a simple example in Python, and tell me when it is a "
     "bad idea to use it instead of a loop."),
    ("Our team keeps missing deadlines because tasks are estimated badly. What are some "
     "practical ways to make estimates more realistic without adding a lot of process?"),
    ("What is photosynthesis? Explain the inputs, the outputs and where in the plant cell "
     "it happens, in a paragraph a high-school student could follow."),
    ("Tell me about the history of the bicycle, from the first wooden designs to modern "
     "road bikes, and why the chain drive mattered so much."),
    ("I am learning to cook. Which five kitchen tools should I buy first, and which popular "
     "gadgets are not worth the money for a beginner?"),
)

WARMUP_QUESTIONS = (
    "Say hello in three languages.",
    "Name a fruit that is yellow.",
    "What is two plus two?",
    "Give me one word that rhymes with light.",
    "Name a planet of the solar system.",
    "What colour is grass?",
    "Count from one to five.",
    "Name an animal that lives in the sea.",
)

SUBJECTS = (
    "The old lighthouse keeper",
    "A small team of engineers",
    "The city council",
    "Our neighbour across the river",
    "The head librarian",
    "A group of volunteers from the school",
    "The regional weather office",
    "The fishing cooperative",
    "A visiting professor of geology",
    "The night-shift nurse",
    "The bakery on the main square",
    "A travelling theatre company",
    "The new railway operator",
    "The museum's restoration staff",
    "A retired ship captain",
    "The farmers' market committee",
    "The youth football club",
    "A local software start-up",
    "The village choir",
    "The harbour master",
    "A pair of wildlife photographers",
    "The water utility",
    "The community garden group",
    "The district's only veterinarian",
)

PREDICATES = (
    "spent most of the winter repairing the northern harbour wall after the storms.",
    "wrote a detailed report about the river's slowly changing course.",
    "asked for more money to keep the evening bus service running.",
    "counted twice as many migrating birds as in the previous autumn.",
    "moved the weekly meeting from Tuesday to Thursday evening.",
    "found several letters from the last century hidden behind a cupboard.",
    "complained that the new road signs were confusing for visitors.",
    "planted a row of apple trees along the edge of the old railway line.",
    "measured unusually warm water in the bay during the first week of March.",
    "organised a free repair café where people could fix broken lamps and radios.",
    "decided to open an hour earlier during the summer holidays.",
    "lost two days of work when the power failed across the whole district.",
    "trained six new apprentices, most of whom had never worked outdoors before.",
    "replaced the wooden bridge with a lighter one made of recycled steel.",
    "recorded the stories of older residents who remembered the great flood.",
    "noticed that fewer tourists came by car and more arrived by bicycle.",
    "published a short guide to the footpaths that connect the three villages.",
    "argued that the market should stay open on Sundays despite the noise.",
    "tested a small solar pump to water the fields during dry weeks.",
    "borrowed an old telescope to show children the moons of Jupiter.",
    "cleared the drainage ditches before the heavy autumn rains arrived.",
    "kept a careful log of every ship that entered the harbour after dark.",
    "painted the faded mural on the side of the fire station.",
    "proposed a festival to celebrate the two-hundredth anniversary of the town.",
)

NOTE_TASKS = (
    "Summarize these notes in a few sentences.",
    "Which of these events seems the most important for the town, and why?",
    "List three people or groups mentioned in the notes and what each of them did.",
    "What problems does the town seem to face, judging from these notes?",
    "Write a short headline for a local newspaper based on these notes.",
    "Which events in these notes are related to the weather or the seasons?",
)

NOTES_INTRO = "Here are some notes from the town's record book."
