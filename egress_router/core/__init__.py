"""The pure core: configuration in, a plan of steps out. Imports only the standard library and core/."""
