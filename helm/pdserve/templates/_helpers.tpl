{{/*
Names and labels. The full name is the RayCluster's name, so it is cut to 53 characters:
KubeRay refuses longer cluster names (it derives pod and Service names from them).
*/}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 53 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods; add app.kubernetes.io/component to pick a role. */}}
{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ include "pdserve.chart" . }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{/* The gateway (head pod) is what the Service and the monitors select. */}}
{{- define "pdserve.gatewaySelectorLabels" -}}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the API key: an existing one, or the one this chart creates. */}}
{{- define "pdserve.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else }}
{{- printf "%s-api-key" (include "pdserve.fullname" .) }}
{{- end }}
{{- end }}

{{/*
"true" when the gateway requires an API key: from `existingSecret`, or from the Secret the
chart creates (`create`, the default). Empty means the API is open (`--allow-unauthenticated`).
*/}}
{{- define "pdserve.apiKeyEnabled" -}}
{{- if or .Values.apiKey.existingSecret .Values.apiKey.create }}true{{ end }}
{{- end }}

{{/* "true" when the chart creates the API key Secret itself. */}}
{{- define "pdserve.apiKeyCreated" -}}
{{- if and .Values.apiKey.create (not .Values.apiKey.existingSecret) }}true{{ end }}
{{- end }}

{{/*
The created Secret's key, base64-encoded: `apiKey.value`; else the key this release stored
before (read back from the cluster, so an upgrade keeps it); else 48 new random letters and
digits. Offline renders (`helm template`) cannot look up, and always generate.
*/}}
{{- define "pdserve.apiKeyData" -}}
{{- if .Values.apiKey.value }}
{{- .Values.apiKey.value | b64enc }}
{{- else }}
{{- $stored := lookup "v1" "Secret" .Release.Namespace (include "pdserve.apiKeySecretName" .) }}
{{- dig "data" .Values.apiKey.secretKey (randAlphaNum 48 | b64enc) $stored }}
{{- end }}
{{- end }}

{{/* `--model`: the PVC path when a PVC is mounted, else model.name. */}}
{{- define "pdserve.modelArg" -}}
{{- if .Values.model.pvc.claimName }}
{{- if .Values.model.path }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.path) }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- else }}
{{- required "model.name or model.pvc.claimName must be set" .Values.model.name }}
{{- end }}
{{- end }}

{{/* Volumes and mounts every pod gets: the model PVC, read-only, when one is set. */}}
{{- define "pdserve.modelVolumes" -}}
{{- if .Values.model.pvc.claimName }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "pdserve.modelVolumeMounts" -}}
{{- if .Values.model.pvc.claimName }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Volumes and mounts of a worker pod: the model's, and /dev/shm as a memory-backed emptyDir
(see values.yaml `sharedMemory` for what lives there and how it is sized).
*/}}
{{- define "pdserve.workerVolumes" -}}
{{- include "pdserve.modelVolumes" . }}
{{- if .Values.sharedMemory.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ required "sharedMemory.sizeLimit must be set (e.g. 1Gi) while sharedMemory.enabled" .Values.sharedMemory.sizeLimit }}
{{- end }}
{{- end }}

{{- define "pdserve.workerVolumeMounts" -}}
{{- include "pdserve.modelVolumeMounts" . }}
{{- if .Values.sharedMemory.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/*
The arguments of `pdserve serve` on the head, one list item per argument. They reach the
process as "$@" (see raycluster.yaml), so no value is ever parsed by a shell.
*/}}
{{- define "pdserve.serveArgs" -}}
{{- $s := .Values.serve }}
{{- $args := list "serve" "--address" "auto" "--host" "0.0.0.0"
    "--port" (toString .Values.gateway.httpPort) "--grpc-port" (toString .Values.gateway.grpcPort)
    "--model" (include "pdserve.modelArg" .) }}
{{- /* The gateway listens on every interface of the pod: without a key it must be told so. */}}
{{- if not (include "pdserve.apiKeyEnabled" .) }}
{{- $args = append $args "--allow-unauthenticated" }}
{{- end }}
{{- with .Values.model.servedModelName }}
{{- $args = concat $args (list "--served-model-name" .) }}
{{- end }}
{{- if $s.colocated }}
{{- $args = append $args "--colocated" }}
{{- else }}
{{- $args = concat $args (list "--prefill-workers" (toString $s.prefillWorkers)) }}
{{- end }}
{{- $args = concat $args (list
    "--decode-workers" (toString $s.decodeWorkers)
    "--router" $s.router
    "--local-prefill-tokens" (toString $s.localPrefillTokens)
    "--spill-backlog-tokens" (toString $s.spillBacklogTokens)
    "--block-size" (toString $s.blockSize)
    "--kv-cache-memory" (toString $s.kvCacheMemoryMiB)
    "--max-num-seqs" (toString $s.maxNumSeqs)
    "--max-num-batched-tokens" (toString $s.maxNumBatchedTokens)
    "--max-prefill-chunk" (toString $s.maxPrefillChunk)
    "--prompt-deadline-factor" (toString $s.promptDeadlineFactor)
    "--max-queued-requests" (toString $s.maxQueuedRequests)
    "--max-in-flight" (toString $s.maxInFlight)
    "--transfer-timeout" (toString $s.transferTimeout)
    "--on-transfer-failure" $s.onTransferFailure
    "--threads" (toString $s.threads)
    "--quantization" $s.quantization
    "--kv-cache-dtype" $s.kvCacheDtype
    "--log-format" $s.logFormat) }}
{{- with $s.otlpEndpoint }}
{{- $args = concat $args (list "--otlp-endpoint" .) }}
{{- end }}
{{- with $s.kvTransport }}
{{- $args = concat $args (list "--kv-transport" .) }}
{{- end }}
{{- if $s.maxModelLen }}
{{- $args = concat $args (list "--max-model-len" (toString $s.maxModelLen)) }}
{{- end }}
{{- if not $s.prefixCaching }}
{{- $args = append $args "--no-prefix-caching" }}
{{- end }}
{{- with $s.speculative }}
{{- $args = concat $args (list "--speculative" . "--num-speculative-tokens" (toString $s.numSpeculativeTokens)
    "--speculative-max-batch" (toString $s.speculativeMaxBatch)) }}
{{- with $s.draftModel }}
{{- $args = concat $args (list "--draft-model" .) }}
{{- end }}
{{- if $s.draftLayers }}
{{- $args = concat $args (list "--draft-layers" (toString $s.draftLayers)) }}
{{- end }}
{{- end }}
{{- with .Values.autoscaling }}
{{- if .enabled }}
{{- $args = append $args "--autoscale" }}
{{- if not $s.colocated }}
{{- $args = concat $args (list "--min-prefill" (toString $.Values.prefill.minReplicas)
    "--max-prefill" (toString $.Values.prefill.maxReplicas)) }}
{{- end }}
{{- $args = concat $args (list
    "--min-decode" (toString $.Values.decode.minReplicas)
    "--max-decode" (toString $.Values.decode.maxReplicas)
    "--autoscale-prefill-tokens" (toString .prefillTokensPerWorker)
    "--autoscale-decode-waiting" (toString .decodeWaitingPerWorker)
    "--autoscale-window" (toString .windowSeconds)
    "--autoscale-up-cooldown" (toString .upCooldownSeconds)
    "--autoscale-down-delay" (toString .downDelaySeconds)
    "--autoscale-down-cooldown" (toString .downCooldownSeconds)) }}
{{- if not (kindIs "invalid" .maxWorkers) }}
{{- $args = concat $args (list "--max-workers" (toString .maxWorkers)) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $s.extraArgs }}
{{- $args = append $args (toString .) }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
Ray custom resources a worker pod advertises, in the single-quoted JSON form KubeRay itself
writes into rayStartParams.resources: the shell that runs `ray start` removes the quotes,
and KubeRay can still parse the map when it adds accelerator resources to it.
*/}}
{{- define "pdserve.rayResources" -}}
{{- printf "'%s'" (toJson (dict .role 1)) }}
{{- end }}

{{/*
Checks across values that the schema cannot express. Each failure says what to change.
*/}}
{{- define "pdserve.validate" -}}
{{- $name := include "pdserve.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayCluster name %q must start with a letter and hold only a-z, 0-9 and '-': set fullnameOverride" $name) }}
{{- end }}
{{- $roles := list "decode" }}
{{- if not .Values.serve.colocated }}
{{- $roles = prepend $roles "prefill" }}
{{- end }}
{{- range $roles }}
{{- $g := index $.Values . }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "%s.minReplicas (%v) must not exceed %s.maxReplicas (%v)" . $g.minReplicas . $g.maxReplicas) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s.replicas (%v) must lie between %s.minReplicas (%v) and %s.maxReplicas (%v)" . $g.replicas . $g.minReplicas . $g.maxReplicas) }}
{{- end }}
{{- if and (not (kindIs "invalid" $g.idleTimeoutSeconds)) (ne (toString $.Values.autoscaling.version) "v2") }}
{{- fail (printf "%s.idleTimeoutSeconds needs autoscaling.version v2 (KubeRay accepts a group's idle timeout only with autoscaler v2)" .) }}
{{- end }}
{{- if lt (float64 $g.numCpus) 1.0 }}
{{- fail (printf "%s.numCpus (%v) must be at least 1: a worker actor asks Ray for one CPU" . $g.numCpus) }}
{{- end }}
{{- end }}
{{- if and (not .Values.serve.colocated) (gt (int .Values.serve.prefillWorkers) (int .Values.prefill.maxReplicas)) }}
{{- fail (printf "serve.prefillWorkers (%v) exceeds prefill.maxReplicas (%v): each prefill worker needs a pod of its own" .Values.serve.prefillWorkers .Values.prefill.maxReplicas) }}
{{- end }}
{{- if gt (int .Values.serve.decodeWorkers) (int .Values.decode.maxReplicas) }}
{{- fail (printf "serve.decodeWorkers (%v) exceeds decode.maxReplicas (%v): each decode worker needs a pod of its own" .Values.serve.decodeWorkers .Values.decode.maxReplicas) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.decode.minReplicas) 1) }}
{{- fail "decode.minReplicas must be at least 1 with autoscaling: pdserve always keeps a decode worker" }}
{{- end }}
{{- if and .Values.apiKey.value (not .Values.apiKey.create) (not .Values.apiKey.existingSecret) }}
{{- fail "apiKey.value is set but apiKey.create is false: set apiKey.create=true to store the key in a Secret the chart creates, or name your own Secret in apiKey.existingSecret" }}
{{- end }}
{{- if and .Values.model.path (not .Values.model.pvc.claimName) }}
{{- fail "model.path is a path inside the model PVC: set model.pvc.claimName too (or use model.name for a path in the image)" }}
{{- end }}
{{- end }}
