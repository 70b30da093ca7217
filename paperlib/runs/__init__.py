"""Trained SAEs through the cache: one configuration (``trained``), the zoo at a target L0 (``zoo``), seeded
arms (``seeding``), width families (``family``) and whether they converged (``convergence``)."""
