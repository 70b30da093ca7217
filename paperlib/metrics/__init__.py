"""How SAEs are compared: consistency across seeds, exact matching, per-latent stability, subspace agreement,
the capacity exponent, and the consistency document others can read (``consistency_json``)."""
