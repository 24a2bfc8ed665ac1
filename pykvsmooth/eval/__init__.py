"""Evaluation like the KVSmooth paper: CHAIR and OPOPE, baseline against KVSmooth.

``python -m pykvsmooth.eval`` (console script ``kvsmooth-eval``) has four subcommands:
``generate`` captions a seeded sample of COCO val2014 images once per setting (this one
needs the native build; it imports :mod:`pykvsmooth`'s ``Llama`` only when run),
``chair`` and ``opope`` score caption files against the COCO annotations, and ``report``
writes the paper's Table 1 for a ``generate`` run with a precision-recall plot.
"""
