"""
Configuration: everything that turns config.yaml, C{$HERMES_HOME/.env} and the environment into
one frozen L{hermes_twisted.config.settings.GatewayConfig}, once, before the reactor runs.

  settings.py    the frozen settings shapes every other package reads (and nothing more)
  loader.py      load and build the configuration; the entry point (L{loader.load_config})
  layers.py      the YAML document and the environment by dotted key
  values.py      typed values and their conversion
  platforms.py   per-platform settings
  envvars.py     the registry of env vars and YAML keys (renders docs/configuration.md)
  dotenv.py      C{$HERMES_HOME} and its C{.env}
  relay_urls.py  the relay's dial and HTTP URLs
  recovery_key.py  the Matrix recovery key's text form (checked at start)
  redaction.py   C{--print-config} with every secret redacted
  errors.py      L{ConfigError}, the usage error naming the key

May import: L{hermes_twisted.model} and itself.  Everything else may import
C{config.settings}; only the command line (C{tap}, C{cli}) imports the loader.
"""
