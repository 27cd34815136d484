"""One module per stage of the pipeline; the registry (``core.casestudy.registry``) lists them."""
