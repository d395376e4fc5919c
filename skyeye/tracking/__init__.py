"""MLflow bookkeeping: the names SkyEye writes (`names`, free of MLflow) and the store,
clients and run lifecycle (`runs`)."""
