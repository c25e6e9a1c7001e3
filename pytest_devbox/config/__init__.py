"""A session's configuration: option table -> project files -> resolution -> Settings; profiles."""
