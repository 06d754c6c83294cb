"""etpo-gym: Gymnasium environments in which language-model agents write data-science code.

Importing this package registers ``DataSciCode-v0``::

    import gymnasium as gym
    import etpo_env

    env = gym.make("DataSciCode-v0", task="breast_cancer", sandbox="auto", mode="fix")
    envs = gym.make_vec("DataSciCode-v0", num_envs=4, vectorization_mode="async")
    pooled = gym.make_vec("DataSciCode-v0", num_envs=8, vectorization_mode="vector_entry_point", pool_size=4)

``gym.make("etpo_env:DataSciCode-v0")`` imports the package itself. The env's settings are the fields of
`etpo_env.config.EnvConfig` (``gym.make(..., config=EnvConfig(...))``, or the same names as keywords); the keys of
its `info` dicts are documented by `etpo_env.info.StepInfo`. Wrappers (episode recorder, env-step budget) are in
`etpo_env.wrappers`, pooled vectorisation in `etpo_env.vector`. This package never imports `agents`.
"""

__version__ = "0.1.0"

ENV_ID = "DataSciCode-v0"


def _register() -> None:
    from gymnasium.envs.registration import register, registry

    if ENV_ID not in registry:
        register(
            id=ENV_ID,
            entry_point="etpo_env.env:DataSciCodeEnv",
            vector_entry_point="etpo_env.vector:make_pooled_vec_env",
        )


_register()
