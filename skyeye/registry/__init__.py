"""SkyEyeGPT in the MLflow model registry: the pyfunc package (`packaging`), registration,
versions and listing (`store`), and the promotion policy with its aliases and rollback
(`promotion`). References to models by folder, run or registry URI are `skyeye.model.references`
(evaluation and training resolve them too, below the registry)."""
