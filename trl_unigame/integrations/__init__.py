"""Integrations of UniGame models with outside evaluation frameworks.

- `trl_unigame.integrations.lmms_eval`: the `unigame` model of lmms-eval (`pip install trl-unigame[lmms]`).
"""
