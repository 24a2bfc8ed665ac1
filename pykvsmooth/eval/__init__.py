"""Evaluation like the KVSmooth paper: CHAIR, OPOPE and AMBER, baseline against KVSmooth.

``python -m pykvsmooth.eval`` (console script ``kvsmooth-eval``) has five subcommands:
``generate`` captions a seeded sample of COCO val2014 images once per setting (this one
needs the native build; it imports :mod:`pykvsmooth`'s ``Llama`` only when run);
``chair`` and ``opope`` score caption files against the COCO annotations, by default with
the reference protocols behind the paper's numbers (:mod:`.opera`: OPERA's CHAIR
extraction; :mod:`.halc`: HALC's OPOPE); ``amber`` scores responses to AMBER's generative
queries (:mod:`.amber`); ``report`` writes the paper's Tables 1, 2 and 4 for a
``generate`` run with a precision-recall plot. The NLTK-based protocols need
``pip install 'pykvsmooth[eval]'`` and NLTK's data (:mod:`.nlp`).
"""
