"""The game's parts, one room each; the trainer composes them."""
