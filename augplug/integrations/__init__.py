"""Training scripts that use augplug inside other libraries' workflows, shipped with the package.

=======================================  ===============================  ==============================
module                                   console script                   needs
=======================================  ===============================  ==============================
:mod:`~.timm_train`                      ``augplug-timm-train``           timm; ``augplug[demo]`` for
                                                                          ``--dataset digits``
:mod:`~.accelerate_train`                ``augplug-accelerate-train``     accelerate; ``augplug[demo]``
                                         (or ``accelerate launch -m
                                         augplug.integrations.
                                         accelerate_train``)
:mod:`~.albumentations_example`          ``augplug-albumentations-        ``augplug[albumentations,demo]``
                                         example``
=======================================  ===============================  ==============================

Each module's ``main(argv)`` runs in-process and returns what it trained. Nothing is imported here, so
``import augplug.integrations`` stays cheap.
"""
