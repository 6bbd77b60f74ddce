"""Does tying embed_tokens to lm_head make the model copy its input token?

The seeds' tied d20 model predicted the current token at every position
(copy_rate near 1, logits 248-261); untied, it collapsed to the most frequent
tokens instead (low unique predictions). copy_rate and unique_predictions
tell the two failure modes apart.
"""

VARIANTS = {
    "untied": {"model.tie_embeddings": False},  # the d20 default
    "tied": {"model.tie_embeddings": True},
}
