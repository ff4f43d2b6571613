{{/* Common labels for every object this chart creates (the Airflow subchart labels its own). */}}
{{- define "iris-drs.labels" -}}
app.kubernetes.io/name: iris-drs
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{/* The Airflow connection `iris_s3` in Airflow's JSON connection form (aws conn type). */}}
{{- define "iris-drs.s3Connection" -}}
{{- $s3 := .Values.iris.s3 -}}
{{- dict "conn_type" "aws" "login" $s3.accessKeyId "password" $s3.secretAccessKey "extra" (dict "endpoint_url" $s3.endpointUrl "region_name" $s3.region) | toJson -}}
{{- end -}}
