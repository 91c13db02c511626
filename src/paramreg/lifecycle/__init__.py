"""The lifecycle: ``attach`` (its options checked, then all or nothing), ``set_strength`` and ``remove``."""
