"""The untrusted side: the sandbox process S that runs a student's notebook."""
