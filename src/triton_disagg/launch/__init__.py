"""Starting the processes of a deployment: tritonserver on the rendered model repository, the OpenAI frontend."""
