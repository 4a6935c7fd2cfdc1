import torch


def correct_topk(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a tensor, no sync)."""
    top = logits.topk(max(ks), dim=1).indices  # (N, max k)
    hits = top == targets.unsqueeze(1)
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])
