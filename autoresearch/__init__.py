"""The study controller: study files, proposers, launchers, trials and the CLI.

Not built yet: the reward environment (``env.text2sql``) and the training
service (``trainer_api``) come first.
"""
