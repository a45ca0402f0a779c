"""The trusted test side: the hidden-test API, its pytest plugin and the test runner."""
