"""Library code a stage calls, usable without a case (DESIGN §3: ``core/methods/``)."""
