-- One database per service, all owned by the compose user.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
CREATE DATABASE orthanc;
