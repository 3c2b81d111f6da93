"""Scale-out on Dask: batch scoring and PaDiM fitting across a cluster, identical to one machine.

Needs `pip install 'defectlens[dask]'` on the client and on every worker (defectlens itself
must be importable there: the tasks are its functions). See the README's "Scale-out on Dask".
"""

from defectlens.distributed.cluster import connect
from defectlens.distributed.fitting import DISTRIBUTED_METHODS, fit_on_cluster
from defectlens.distributed.scoring import score_on_cluster

__all__ = ["DISTRIBUTED_METHODS", "connect", "fit_on_cluster", "score_on_cluster"]
