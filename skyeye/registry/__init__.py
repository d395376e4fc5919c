"""SkyEyeGPT in the MLflow model registry: the pyfunc package (`packaging`), registration,
versions and listing (`store`), references to models by folder, run or registry URI
(`references`), and the promotion policy with its aliases and rollback (`promotion`)."""
