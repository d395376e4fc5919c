"""MLflow bookkeeping: the names SkyEye writes (`names`, free of MLflow) and the store,
clients and run lifecycle (`runs`); and the digest of the project code a result comes
from (`codehash`), which cached results are keyed on."""
