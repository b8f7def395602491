"""trivit's top layer: the ``trivit`` command line and everything that runs models of several
frameworks together (``trivit demo``, ``trivit convert --verify``).

Layers (each imports only those below it; see docs/architecture.md)::

    trivit  ->  vit_torch / vit_tf / vit_flax  ->  conversion  ->  vit_core

Nothing below imports this package. Importing it is light: the frameworks load on use.
"""

#: Marks trivit's package (see :func:`vit_core.imports.import_trivit`).
__trivit_package__ = "trivit"
