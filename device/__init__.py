"""The on-device agent: receives models over MQTT, gates them, runs them and reports health."""
