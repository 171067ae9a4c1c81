"""Studies built on jaxprop.studies (the complexity study)."""
