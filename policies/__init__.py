"""Access policies: who may reach which instruments, with what, for how long.

Pure and default-deny. The session issue adds the first decisions (cap, grant
timeout and channels from config); the policies issue makes them a rule model
loaded from files. Until then no session can be requested at all, which is the
default-deny answer.
"""
