"""The demo (residual vs HC vs mHC on a deep GPT) and its small models and data — outside the library core."""
