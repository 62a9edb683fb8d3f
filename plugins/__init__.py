"""Your own registry members, imported by name from ``plugins.modules`` in params.yaml before the params are checked.

One file per member, e.g. ``plugins/my_rule.py`` holding an aggregator registered as ``my_rule``::

    plugins:
      modules: [plugins.my_rule]
    federation:
      aggregator: my_rule

Every stage depends on this folder, so editing a plugin reruns what it can change. See docs/architecture.md,
"Add an aggregator, a local algorithm or a study".
"""
