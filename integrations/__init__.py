"""Training scripts and examples that use augplug inside other libraries' workflows."""
