"""Parts of the `skyeye` command (skyeye/cli.py): how it prints, reads its inputs and reports
errors, and the doctor and ablation commands."""
