"""Does changing the loss keep the predictions diverse?

The seeds blamed the cross-entropy for rewarding the collapse (the loss fell
while the unique tokens went 20 -> 2) and found label smoothing 0.1 had no
effect; entropy regularization was planned and never run. The z-loss (PaLM,
arXiv 2204.02311: 1e-4 x logsumexp(logits)^2) bounds the logits' scale, the
seeds' tied model reached logits of 248-261.

Entropy weight beta = 0.05: the bonus beta x H is at most 0.05 x ln(8192) =
0.45 nats (uniform predictions) against a cross-entropy of ~9 nats at the
start and 3-6 nats later, so it cannot outweigh learning, while a collapse to
a handful of tokens (H of 1-2 nats instead of 4-6) costs 0.1-0.25 nats, the
size of the loss differences the seeds saw. (0.01 would cost a collapse only
~0.03 nats; 0.1 pays up to 0.9 nats for uniform predictions.) The term is the
confidence penalty of Pereyra et al. (arXiv 1701.06548).
"""

VARIANTS = {
    "none": {},  # the preset's loss: plain cross-entropy
    "label_smoothing": {"train.label_smoothing": 0.1},  # the seeds' value
    "entropy": {"train.entropy_weight": 0.05},  # loss - 0.05 x mean entropy
    "z_loss": {"train.z_loss_weight": 1e-4},  # PaLM's weight
}
