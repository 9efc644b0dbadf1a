"""Writers that stream corpora into datastores (pure numpy, plus a tokenizer handed in)."""
