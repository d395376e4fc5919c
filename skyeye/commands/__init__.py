"""Parts of the `skyeye` command (skyeye/cli.py): how it prints, and the commands of the
schedule and the local servers."""
