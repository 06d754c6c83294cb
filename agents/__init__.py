"""Agents that act in DataSciCode-v0: the LM policy, ETPO, PPO, SFT and prompting."""
