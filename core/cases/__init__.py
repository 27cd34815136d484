"""Built-in cases: each folder holds a case's TOML, its data adapter and its priors (DESIGN §9)."""
