"""Loss terms that more than one method uses: image–text contrastive terms, distillation and relation preservation.

Every function takes normalised features and returns a scalar, so methods compose them with their own weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_over(logits: torch.Tensor, labels: torch.Tensor, classes: slice | None) -> torch.Tensor:
    """Cross-entropy of ``logits`` over every class (``classes=None``) or only over the slice ``classes`` (the
    current task's, so a task's training does not push its images away from earlier classes' text)."""
    if classes is None:
        return F.cross_entropy(logits.float(), labels)
    return F.cross_entropy(logits[:, classes].float(), labels - classes.start)


def text_to_image_contrastive(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                              scale: torch.Tensor) -> torch.Tensor:
    """For each class in the batch, its text against the batch's images: the mean negative log-probability of
    that class's own images (supervised contrastive, text to image)."""
    present = torch.unique(labels)
    logits = scale * text_features[present] @ image_features.T  # [classes in batch, images]
    log_probs = logits.float().log_softmax(dim=1)
    positives = (labels.unsqueeze(0) == present.unsqueeze(1)).float()
    return -((log_probs * positives).sum(dim=1) / positives.sum(dim=1)).mean()


def symmetric_image_text_contrastive(image_features: torch.Tensor, text_features: torch.Tensor,
                                     labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between the batch's images and their classes' texts: image to text over the texts of
    the classes present in the batch, and text to image over the batch's images, averaged. Unlike cross-entropy over
    every class, it aligns the two modalities within the batch without pushing against absent classes."""
    present, position = torch.unique(labels, return_inverse=True)
    image_to_text = F.cross_entropy((scale * image_features @ text_features[present].T).float(), position)
    return 0.5 * (image_to_text + text_to_image_contrastive(image_features, text_features, labels, scale))


def distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(old/T) || softmax(new/T)) * T^2`` averaged over the batch (Hinton's knowledge distillation; the
    ``T^2`` keeps its gradient scale independent of the temperature)."""
    old = F.log_softmax(old_logits.float() / temperature, dim=-1)
    new = F.log_softmax(new_logits.float() / temperature, dim=-1)
    return F.kl_div(new, old, reduction="batchmean", log_target=True) * temperature**2


def relation_preservation(new_features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the batch's cosine-similarity matrices under the new and the old model
    (the mean rather than the sum, so the weight does not depend on the batch size); zero for identical models."""
    new = F.normalize(new_features.float(), dim=-1)
    old = F.normalize(old_features.float(), dim=-1)
    return (new @ new.T - old @ old.T).pow(2).mean()
