"""Joint clustering of image and text embeddings: do the two modalities share one class structure?

The protocol (DESIGN.md §3): image embeddings stacked with one class-prompt text per image (templates taken in
turn), clustered with KMeans (k = number of classes) and HDBSCAN, scored by ARI and NMI against the class labels
duplicated for both modalities. With a gap, clusters split by modality first and ARI stays low.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from cmalign.errors import ConfigError

HDBSCAN_PCA_DIMS = 50  # tree-based HDBSCAN on 10k × 512 took ~100 s here; after PCA to 50 dims, ~5 s


def joint_clustering(image_emb: np.ndarray, text_emb: np.ndarray, labels, seed: int = 0,
                     hdbscan: bool = True, min_cluster_size: int | None = None, return_assignments: bool = False):
    """Cluster ``[images; texts]`` (text i belongs with image i) and score against ``labels`` twice over.

    ``return_assignments=True`` returns ``(figures, assignments)``: the class index of each image (``"truth"``) and
    the cluster of every point of ``[images; texts]`` (``"kmeans"``, ``"hdbscan"``), so that scores can be
    recomputed on resampled images with the clustering held fixed.
    """
    image_emb, text_emb = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if image_emb.shape != text_emb.shape:
        raise ConfigError(f"one text per image is needed: {image_emb.shape} images vs {text_emb.shape} texts")
    labels = np.asarray(labels)
    if len(labels) != len(image_emb):
        raise ConfigError(f"{len(labels)} labels for {len(image_emb)} images")
    classes, truth = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ConfigError("joint clustering needs at least 2 classes")
    points = np.concatenate([image_emb, text_emb])
    truth2 = np.concatenate([truth, truth])
    modality = np.repeat([0, 1], len(image_emb))

    km = KMeans(n_clusters=len(classes), n_init=10, random_state=seed).fit_predict(points)
    out = {
        "classes": int(len(classes)), "points": int(len(points)),
        "kmeans_ari": float(adjusted_rand_score(truth2, km)),
        "kmeans_nmi": float(normalized_mutual_info_score(truth2, km)),
        # how far the clusters follow modality instead of class (1 = clusters are exactly the two modalities)
        "kmeans_modality_nmi": float(normalized_mutual_info_score(modality, km)),
    }
    assignments = {"truth": truth, "kmeans": km}
    if hdbscan:
        scores = _hdbscan_scores(points, truth2, len(classes), seed, min_cluster_size)
        assignments["hdbscan"] = scores.pop("_pred")
        out.update(scores)
    return (out, assignments) if return_assignments else out


def _hdbscan_scores(points: np.ndarray, truth: np.ndarray, n_classes: int, seed: int,
                    min_cluster_size: int | None) -> dict:
    import hdbscan

    dims = min(HDBSCAN_PCA_DIMS, len(points))  # PCA has at most as many components as points
    if points.shape[1] > dims:
        points = PCA(dims, random_state=seed).fit_transform(points)
    # a class seen from one modality is half of its points; a cluster should be a sizeable share of that
    size = min_cluster_size or max(5, len(points) // (4 * n_classes))
    pred = hdbscan.HDBSCAN(min_cluster_size=size, min_samples=5).fit_predict(points)
    noise = pred < 0
    return {
        # adjusted_rand_score treats noise (−1) as one more cluster; read it beside the noise share
        "hdbscan_ari": float(adjusted_rand_score(truth, pred)),
        "hdbscan_nmi": float(normalized_mutual_info_score(truth, pred)),
        "hdbscan_clusters": int(len(set(pred[~noise]))),
        "hdbscan_noise_share": float(noise.mean()),
        "hdbscan_min_cluster_size": int(size),
        "_pred": pred,
    }


DEFINITIONS = {
    "kmeans_ari": "adjusted Rand index of KMeans (k = classes) on [images; class-prompt texts] against the labels "
                  "duplicated for both modalities (1 = clusters are the classes, 0 = chance)",
    "kmeans_nmi": "normalised mutual information of the same clustering",
    "kmeans_modality_nmi": "NMI of the same clusters against modality (high = clusters split by modality)",
    "hdbscan_ari": "ARI of HDBSCAN on the same points (after PCA to 50 dims); noise (−1) counts as a cluster",
    "hdbscan_nmi": "NMI of the same",
    "hdbscan_noise_share": "share of points HDBSCAN left as noise; read beside its ARI",
}
