"""Selection algorithms over embeddings (pure numpy, independent of the segmentation backend).

- :mod:`~alseg.selection.flqmi`: FLQMI (submodular mutual information, facility-location variant) and its
  naive / stochastic greedy maximisation over a pool × query similarity, dense or computed on demand.
- :mod:`~alseg.selection.kcenter`: greedy k-center (Core-Set).
- :mod:`~alseg.selection.kmeanspp`: k-means++ seeding (BADGE).
- :mod:`~alseg.selection.usim`: the USIM pipeline (query-set size, query set, cosine / Fisher similarity, FLQMI).
"""

from alseg.selection.flqmi import (
    DenseSimilarity,
    FLQMIResult,
    InnerProductKernel,
    SimilarityRows,
    cosine_kernel,
    cosine_similarity_matrix,
    flqmi_maximize,
    flqmi_select,
    flqmi_value,
    stochastic_sample_size,
)
from alseg.selection.kcenter import KCenterResult, kcenter_greedy, min_sq_distances
from alseg.selection.kmeanspp import kmeanspp_seeding
from alseg.selection.usim import (
    Projection,
    USIMResult,
    empirical_fisher_diagonal,
    fisher_kernel,
    fisher_kernel_similarity,
    fisher_parameter_subset,
    make_projection,
    project_embeddings,
    query_set_size,
    sample_query_set,
    select_usim,
)

__all__ = [
    "DenseSimilarity",
    "FLQMIResult",
    "InnerProductKernel",
    "KCenterResult",
    "Projection",
    "SimilarityRows",
    "USIMResult",
    "cosine_kernel",
    "cosine_similarity_matrix",
    "empirical_fisher_diagonal",
    "fisher_kernel",
    "fisher_kernel_similarity",
    "fisher_parameter_subset",
    "flqmi_maximize",
    "flqmi_select",
    "flqmi_value",
    "kcenter_greedy",
    "kmeanspp_seeding",
    "make_projection",
    "min_sq_distances",
    "project_embeddings",
    "query_set_size",
    "sample_query_set",
    "select_usim",
    "stochastic_sample_size",
]
