"""On-disk datastores: token streams, suffix arrays, n-gram tables and their manifest (pure numpy)."""
